"""Handcrafted pretext tasks: a target made from the image itself (rotation, jigsaw, context, colorization, inpainting)."""
