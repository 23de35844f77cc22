"""stellar-tok: the STELLAR sparse image tokenizer (F = L·S) and a diffusion transformer over its latent."""
from .latent import Latent, LatentStats
from .latent_data import LatentDataset
from .tokenizer import StellarTokenizer

__all__ = ["StellarTokenizer", "Latent", "LatentStats", "LatentDataset"]
__version__ = "0.1.0"
