"""Procedural demo data set, tiny text encoder and pixel-space diffusion model (plain torch)."""
