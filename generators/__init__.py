"""Generators over the STELLAR latent (class-conditional diffusion transformer); see the README."""
