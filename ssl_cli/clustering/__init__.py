"""Clustering of extracted features: preprocessing (PCA-whiten, L2), k-means backends, and metrics."""
