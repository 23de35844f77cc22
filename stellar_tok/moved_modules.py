"""Old module paths of stellar-tok 0.1 (before the library was grouped by role) keep importing for one release:
`import stellar_tok.tokenizer` gives `stellar_tok.model.tokenizer` with a FutureWarning naming the new path."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "alignment": "losses.alignment",
    "budget": "training.budget",
    "checkpoint": "training.checkpoint",
    "crops": "data.crops",
    "engine": "training.engine",
    "fid": "evaluation.fid",
    "fid_reference": "evaluation.fid_reference",
    "guards": "training.guards",
    "latent": "model.latent",
    "latent_data": "latents.dataset",
    "mae_init": "model.mae_init",
    "metrics": "evaluation.metrics",
    "objective": "training.objective",
    "probing": "evaluation.probing",
    "reconstruction": "losses.reconstruction",
    "shapes": "data.shapes",
    "tokenizer": "model.tokenizer",
    "tokenizer_training": "training.tokenizer_weights",
    "tokenizing": "latents.writer",
    "views": "data.views",
    "visual": "evaluation.pictures",
    "vit": "model.vit",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, leaf = fullname.rpartition(".")
        if prefix != self.package or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module):
        old = module.__name__
        new = f"{self.package}.{MOVED[old.rpartition('.')[2]]}"
        warnings.warn(f"{old} moved to {new}; the old path stops working in the next release", FutureWarning, stacklevel=2)
        sys.modules[old] = importlib.import_module(new)  # the import system returns what sys.modules holds


def install(package: str) -> None:
    """Make the old module paths of `package` importable (once)."""
    if not any(isinstance(f, _MovedModuleFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder(package))
