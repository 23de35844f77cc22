"""stellar-tok: the STELLAR sparse image tokenizer (F = L·S) and a diffusion transformer over its latent."""
from .latent import Latent, LatentStats
from .tokenizer import StellarTokenizer

__all__ = ["StellarTokenizer", "Latent", "LatentStats"]
__version__ = "0.1.0"
