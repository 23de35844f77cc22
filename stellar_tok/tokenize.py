"""Encode a data set with a trained tokenizer into latent shards, for generator training.

    python -m stellar_tok.tokenize tokenizer=runs/tiny/tokenizer data.name=shapes out=latents/shapes [flip=true]
    accelerate launch -m stellar_tok.tokenize tokenizer=DIR data.name=wds data.path=/data/train-{000000..000999}.tar out=DIR

Writes `out/shards/<split>-NNNNNN.safetensors`, `out/manifest.json` and `out/stats.json` (format:
`stellar_tok.latents.dataset`). Images are centre-cropped to the tokenizer's resolution (no random crops: the
cache is deterministic); `flip=true` also stores the latent of the mirrored image. The work is cut into
shards (`shard_size` images of an image folder or embedded set; one latent shard per input tar for
webdataset) and process p of P takes shards p, p+P, ... Restarting the same command skips finished shards;
a shard is written under a temporary name and renamed when whole. A folder made by another tokenizer, other
settings or another list of input files (an image folder or shard directory that changed since) is refused
(use a new `out=` or `overwrite=true`).

An input tar that cannot be read whole (missing, unreadable, cut short) is a failed shard: nothing of it is
written, the manifest stays incomplete, the summary line names it and the command exits with status 1;
rerunning the same command once the input is readable redoes exactly the failed shards. SIGTERM or SIGINT (to the
process or its whole group, e.g. a cluster's preemption) finishes the shard being encoded and stops: the manifest
lists the finished shards and marks the others "not done: stopped by SIGTERM", the command exits with status 1 and
rerunning it does the rest. Samples without a class (label -1) are kept and counted in the summary;
class-conditional training refuses them (`LatentDataset.num_classes`).
"""
from __future__ import annotations

from stellar_tok.latents.writer import TokenizeConfig, tokenize

from .config import load_tokenizer_command_config, parse_overrides
from .errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m stellar_tok.tokenize", __doc__, TokenizeConfig, argv, "tokenizer=DIR out=DIR data.name=shapes flip=true")
    cfg = load_tokenizer_command_config(overrides, TokenizeConfig)
    summary = tokenize(cfg)
    if summary.get("failed"):  # the summary line said which input shards failed
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
