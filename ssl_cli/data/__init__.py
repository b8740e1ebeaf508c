"""Data sources: image folders, HDF5 stores, Fashion-MNIST and procedural toy images."""
