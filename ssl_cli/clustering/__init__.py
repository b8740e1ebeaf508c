"""Clustering of extracted features: PCA-whiten + L2, k-means backends, SCAN heads, metrics, summaries."""
