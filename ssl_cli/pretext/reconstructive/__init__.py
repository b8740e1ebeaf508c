"""Reconstructive baselines: the network learns to reproduce its input (autoencoder, denoising autoencoder)."""
