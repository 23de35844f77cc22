"""Convert a published STELLAR checkpoint (Hugging Face Hub model microsoft/STELLAR) into a tokenizer folder.

    hf download microsoft/STELLAR stellar-b16.safetensors --local-dir weights
    python -m stellar_tok.convert_reference src=weights/stellar-b16.safetensors out=weights/stellar-b16

src: the reference's `.safetensors`, or a Lightning `.ckpt` (read with torch.load(weights_only=True); keys under
`model.` are accepted). Width, depth, patch size, position grid and r come from the tensors; the heads from the width
(768: 12, 1024: 16, 1280: 16) unless heads= is given; tau is the reference's 0.06 unless tau= is given. The encoder,
[CLS], position embeddings, sparse tokens and both localization projections are mapped exactly; the decoder blocks
start from the reference's decoder (decoder=fresh: untrained), the pixel head untrained. out: a new folder, written
whole or not at all, that `StellarTokenizer.from_pretrained(out)` loads, with conversion.json (what was mapped, what
was left and why) and, when the clustering heads fit ours, align_heads.safetensors. Prints one summary line.

Then train what the published weights lack (the bottleneck and the pixel decoder, the encoder frozen):

    python -m stellar_tok.train config=vit_b16_from_reference model.init_from=weights/stellar-b16

The conversion itself is `stellar_tok.model.convert_reference`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stellar_tok.model.convert_reference import convert_reference, save_converted

from .config import parse_command
from .errors import UserError, cli_entry


@dataclass
class ConvertConfig:
    src: Optional[str] = None  # the reference checkpoint: .safetensors or a Lightning .ckpt
    out: Optional[str] = None  # the tokenizer folder to write (must not exist)
    heads: int = 0  # encoder heads; 0: from the width (768: 12, 1024: 16, 1280: 16)
    tau: float = 0.06  # the localization temperature the reference was trained with
    latent_channels: int = 32  # c, our bottleneck's channels per token (trained afterwards)
    norm_eps: float = 1e-12  # the encoder's LayerNorm eps: HF ViT's layer_norm_eps
    decoder: str = "reference"  # reference: decoder blocks and bottleneck start from the reference's | fresh
    decoder_heads: int = 8  # the reference decoder's heads (not readable from the tensors)


@cli_entry
def main(argv: list[str] | None = None) -> str:
    cfg = parse_command("python -m stellar_tok.convert_reference", __doc__, ConvertConfig, argv,
                        "src=stellar-b16.safetensors out=weights/stellar-b16")
    if not cfg.src or not cfg.out:
        raise UserError("src=FILE and out=DIR are both required (see --help)")
    converted = convert_reference(cfg.src, heads=cfg.heads, tau=cfg.tau, latent_channels=cfg.latent_channels,
                                  norm_eps=cfg.norm_eps, decoder=cfg.decoder, decoder_heads=cfg.decoder_heads)
    out = save_converted(converted, cfg.out)
    print(f"{converted.report['summary']} -> {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
