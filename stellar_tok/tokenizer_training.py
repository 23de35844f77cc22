"""What tokenizer training does to a tokenizer besides its steps, as library functions (the trainer, tests and
tools call them):

    load_frozen_encoder(tokenizer, "runs/align_only/tokenizer")   # train.decoder_from: its encoder, frozen; a fresh decoder
    stats = compute_latent_stats(tokenizer, loader, device, 20)    # what an export ships: LatentStats of held-out images
"""
from __future__ import annotations

import math

import torch

from .errors import UserError


def load_frozen_encoder(tokenizer, path: str) -> None:
    """Everything but the decoder from the tokenizer exported at `path`; then a fresh, trainable decoder, the rest frozen."""
    from .tokenizer import StellarTokenizer

    source = StellarTokenizer.from_pretrained(path)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(StellarTokenizer.DECODER_PREFIXES)}
    missing, unexpected = tokenizer.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(StellarTokenizer.DECODER_PREFIXES) for k in missing):
        raise UserError(f"train.decoder_from={path}: its weights do not fit the encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer.fresh_decoder_on_frozen_encoder()


@torch.no_grad()
def compute_latent_stats(tokenizer, loader, device, batches: int):
    """Per-channel mean/std of the tokens and scalar mean/std of log L over `batches` clean batches of `loader`."""
    from .latent import LatentStats
    from .views import to_unit_range

    tok_sum = tok_sq = None
    loc_sum = loc_sq = 0.0
    n_tok = n_loc = 0
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        lat = tokenizer.encode(to_unit_range(images, device))
        t = lat.z.flatten(0, 1).double()
        tok_sum = t.sum(0) if tok_sum is None else tok_sum + t.sum(0)
        tok_sq = (t**2).sum(0) if tok_sq is None else tok_sq + (t**2).sum(0)
        n_tok += t.shape[0]
        loc_sum += lat.log_loc.double().sum().item()
        loc_sq += (lat.log_loc.double() ** 2).sum().item()
        n_loc += lat.log_loc.numel()
    mean = tok_sum / n_tok
    std = (tok_sq / n_tok - mean**2).clamp_min(0).sqrt()
    lm = loc_sum / n_loc
    ls = math.sqrt(max(loc_sq / n_loc - lm**2, 0.0))
    return LatentStats(mean.float(), std.float(), torch.tensor(lm, dtype=torch.float32), torch.tensor(ls, dtype=torch.float32))
