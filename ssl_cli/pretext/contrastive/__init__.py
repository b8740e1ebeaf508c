"""Contrastive methods (instance discrimination): SimCLR, SimCLRv2, MoCo, MoCo v2, PIRL."""
