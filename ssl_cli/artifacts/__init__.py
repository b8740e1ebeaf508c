"""Versioned artifacts: HDF5 files for arrays, torch checkpoints for models.

Every artifact carries the same provenance (schema, fingerprint, config, inputs, code_version,
created); `h5` is the only module that imports h5py.
"""
