"""Clustering methods (labels from the data itself): DeepCluster, SeLa, SwAV."""
