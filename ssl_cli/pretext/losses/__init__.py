"""Losses of the contrastive methods, one per module, each a pure function of tensors."""
