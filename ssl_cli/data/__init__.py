"""Images in, tensors out: sources (folder, HDF5, Fashion-MNIST, toy), datasets, transforms, views, colour."""
