"""stellar-tok: the STELLAR sparse image tokenizer (F = L·S) and a diffusion transformer over its latent."""
from stellar_tok.latents.dataset import LatentDataset
from stellar_tok.model.latent import Latent, LatentStats
from stellar_tok.model.tokenizer import StellarTokenizer

from .moved_modules import install as _install_moved_modules

_install_moved_modules(__name__)  # old module paths (stellar_tok.tokenizer, ...) import with a FutureWarning

__all__ = ["StellarTokenizer", "Latent", "LatentStats", "LatentDataset"]
__version__ = "0.1.0"
