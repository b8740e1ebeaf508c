"""The one training loop every training stage uses (pretext, retrain, finetune, self-train)."""
