"""Handcrafted pretext tasks, a target made from the image: rotation, jigsaw(++), context, colorization, inpainting."""
