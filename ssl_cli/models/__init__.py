"""Architectures by name, their named layers, and networks loaded with their input settings."""
