"""Handcrafted pretext tasks, one module each, registered by name in `registry`."""
