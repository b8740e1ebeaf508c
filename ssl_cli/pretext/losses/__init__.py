"""The methods' losses, one per module (contrastive, clustering, SCAN, reconstruction), pure functions."""
