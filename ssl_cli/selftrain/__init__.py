"""Self-training (Noisy Student; Zoph et al. 2020): teacher predictions -> filtered pseudo-labels -> student."""
