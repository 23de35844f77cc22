"""What tokenizer training does to a tokenizer besides its steps, as library functions (the trainer, tests and
tools call them):

    load_frozen_encoder(tokenizer, "runs/align_only/tokenizer")   # train.decoder_from: its encoder, frozen; a fresh decoder
    stats = compute_latent_stats(tokenizer, loader, device, 20)    # what an export ships: LatentStats of held-out images
"""
from __future__ import annotations

import torch

from stellar_tok.errors import UserError


def load_frozen_encoder(tokenizer, path: str) -> None:
    """Everything but the decoder from the tokenizer exported at `path`; then a fresh, trainable decoder, the rest frozen."""
    from stellar_tok.model.tokenizer import StellarTokenizer

    source = StellarTokenizer.from_pretrained(path)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(StellarTokenizer.DECODER_PREFIXES)}
    missing, unexpected = tokenizer.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(StellarTokenizer.DECODER_PREFIXES) for k in missing):
        raise UserError(f"train.decoder_from={path}: its weights do not fit the encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer.fresh_decoder_on_frozen_encoder()


@torch.no_grad()
def compute_latent_stats(tokenizer, loader, device, batches: int):
    """Per-channel mean/std of z and scalar mean/std of log L over `batches` clean batches of `loader` (the same
    float64 sums as a tokenized latent set's statistics, `stellar_tok.latents.dataset.StatsAccumulator`)."""
    from stellar_tok.latents.dataset import StatsAccumulator
    from stellar_tok.data.views import to_unit_range

    acc = StatsAccumulator(tokenizer.config.latent_channels)
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        lat = tokenizer.encode(to_unit_range(images, device))
        acc.add(lat.z, lat.log_loc)
    return acc.stats()
