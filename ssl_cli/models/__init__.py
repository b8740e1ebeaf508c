"""Architectures by name, with named layers for extraction and linear probes."""
