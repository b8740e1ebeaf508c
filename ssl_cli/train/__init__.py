"""The one training loop of every training stage, with its recipe, LARS, schedules, sampler, monitor, DDP."""
