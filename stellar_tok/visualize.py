"""Pictures of what a tokenizer learned, as PNG files.

    python -m stellar_tok.visualize tokenizer=runs/tiny/tokenizer data.name=shapes out=runs/tiny/pictures [logs=runs/tiny/logs]

Writes into `out`:
- reconstructions.png  rows: input, reconstruction, localization map (each patch coloured by its arg-max token)
- token_heatmaps.png   per image: input, arg-max map, then the r columns of L as heat maps, titled with each
                       token's share of the image (mean of its column)
- token_swap.png       "what" and "where" apart: decode(S of A, L of B) puts A's content in B's layout and
                       decode(S of B, L of A) the reverse, next to A, B and their reconstructions
- token_dropout.png    what each token carries: the reconstruction with one token removed (its column of L
                       dropped, rows renormalised), for the tokens with the largest share
- loss_curves.png      every scalar of the training's TensorBoard logs (`logs=`, default: the `logs` folder
                       beside the exported tokenizer), or of its metrics.jsonl when there are no event files
Images come from the start of the val split, in order (the same images each run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from stellar_tok.evaluation.figures import visualize

from .config import DataConfig, load_tokenizer_command_config, parse_overrides
from .errors import cli_entry


@dataclass
class VisualizeConfig:
    tokenizer: Optional[str] = None  # an exported tokenizer folder
    out: Optional[str] = None  # folder for the PNG files
    data: DataConfig = field(default_factory=DataConfig)  # data.resolution defaults to the tokenizer's image_size
    split: str = "val"
    n: int = 8  # images in the reconstruction grid
    heatmap_images: int = 4
    swap_pairs: int = 6
    dropout_tokens: int = 8  # tokens shown in token_dropout.png (largest share first)
    logs: Optional[str] = None  # TensorBoard log folder (or a run folder); default: beside the tokenizer
    device: str = "cpu"


@cli_entry
def main(argv: list[str] | None = None) -> list[str]:
    overrides = parse_overrides("python -m stellar_tok.visualize", __doc__, VisualizeConfig, argv, "tokenizer=DIR data.name=shapes out=DIR")
    cfg = load_tokenizer_command_config(overrides, VisualizeConfig)
    written = visualize(cfg)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
