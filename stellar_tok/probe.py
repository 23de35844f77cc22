"""Semantic probes of a tokenizer's features: linear probe and weighted kNN, on a held-out split.

    python -m stellar_tok.probe tokenizer=runs/tiny/tokenizer data.name=shapes [features=tokens,cls] [random_init=true]

Features are extracted once per split (no augmentation): `tokens` is the mean of the r sparse tokens S,
`cls` the CLS token, `pixels` the raw image. Linear probe: LayerNorm + Linear trained with AdamW on the
train split (full-batch-free mini-batches, a fixed number of epochs, cosine LR), top-1 on the val split.
kNN: cosine similarity, k = 20, votes weighted by exp(sim / 0.07) (the DINO protocol).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError, cli_entry


@torch.no_grad()
def extract_features(tokenizer, loader, kinds=("tokens", "cls"), device="cpu", max_images: int | None = None):
    """-> dict kind -> (n, D) float tensor, plus "labels" (n,)."""
    feats = {k: [] for k in kinds}
    labels = []
    n = 0
    for images, y in loader:
        x = images.to(device).float() / 127.5 - 1
        if tokenizer is not None and any(k != "pixels" for k in kinds):
            f = tokenizer.features(x)
        for k in kinds:
            if k == "tokens":
                feats[k].append(f["tokens"].float().mean(1).cpu())
            elif k == "cls":
                feats[k].append(f["cls"].float().cpu())
            elif k == "lowrank":
                feats[k].append(f["lowrank"].float().mean(1).cpu())
            elif k == "pixels":
                feats[k].append(x.flatten(1).cpu())
            else:
                raise UserError(f"unknown feature kind {k!r}; use tokens, cls, lowrank or pixels")
        labels.append(torch.as_tensor(y))
        n += len(y)
        if max_images and n >= max_images:
            break
    out = {k: torch.cat(v) for k, v in feats.items()}
    out["labels"] = torch.cat(labels).long()
    return out


def linear_probe(xtr, ytr, xva, yva, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> float:
    """LayerNorm + Linear on frozen features; returns top-1 (%) on the val features."""
    g = torch.Generator().manual_seed(seed)
    classes = int(max(ytr.max(), yva.max())) + 1
    with torch.random.fork_rng(devices=[]):  # the head's initialisation depends on the seed only, not on earlier draws
        torch.manual_seed(seed)
        head = nn.Sequential(nn.LayerNorm(xtr.shape[1]), nn.Linear(xtr.shape[1], classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((head(xva).argmax(-1) == yva).float().mean() * 100)


@torch.no_grad()
def knn_classify(xtr, ytr, xva, yva, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (%): cosine similarity, k neighbours, votes weighted by exp(sim / T)."""
    xtr, xva = F.normalize(xtr.float(), dim=1), F.normalize(xva.float(), dim=1)
    classes = int(max(ytr.max(), yva.max())) + 1
    k = min(k, len(xtr))
    correct = 0
    for i in range(0, len(xva), chunk):
        sim, idx = (xva[i : i + chunk] @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes).scatter_add_(1, ytr[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == yva[i : i + chunk]).sum().item()
    return 100.0 * correct / len(xva)


def run_probes(tokenizer, data_cfg, kinds=("tokens", "cls"), epochs: int = 30, batch_size: int = 256, device="cpu", max_train: int | None = None) -> dict:
    from .data import build_loader

    tr = extract_features(tokenizer, build_loader(data_cfg, batch_size, "train", shuffle=False, drop_last=False), kinds, device, max_train)
    va = extract_features(tokenizer, build_loader(data_cfg, batch_size, "val"), kinds, device)
    res = {}
    for k in kinds:
        res[f"linear_{k}"] = round(linear_probe(tr[k], tr["labels"], va[k], va["labels"], epochs=epochs), 2)
        res[f"knn_{k}"] = round(knn_classify(tr[k], tr["labels"], va[k], va["labels"]), 2)
    res["n_train"], res["n_val"] = len(tr["labels"]), len(va["labels"])
    return res


@cli_entry
def main(argv=None):
    from omegaconf import OmegaConf

    from .config import DataConfig
    from .tokenizer import StellarTokenizer

    p = argparse.ArgumentParser(prog="python -m stellar_tok.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="tokenizer=DIR, features=tokens,cls, epochs=30, random_init=false, seed=0, data.KEY=VALUE ...")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    kv = dict(s.split("=", 1) for s in a.args if "=" in s)
    bad = [s for s in a.args if "=" not in s]
    if bad:
        raise UserError(f"argument {bad[0]!r} is not of the form key=value")
    data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist([f"{k[5:]}={v}" for k, v in kv.items() if k.startswith("data.")]))
    kinds = tuple(kv.get("features", "tokens,cls").split(","))
    tok = None
    if any(k != "pixels" for k in kinds):
        if "tokenizer" not in kv:
            raise UserError("tokenizer=DIR is required (an exported tokenizer folder)")
        tok = StellarTokenizer.from_pretrained(kv["tokenizer"]).eval()
        if kv.get("random_init", "false").lower() == "true":  # same architecture, fresh weights
            torch.manual_seed(int(kv.get("seed", 0)))
            tok = StellarTokenizer(**{k: v for k, v in tok.config.items() if not k.startswith("_")}).eval()
    t = time.time()
    res = run_probes(tok, data_cfg, kinds, epochs=int(kv.get("epochs", 30)))
    res["seconds"] = round(time.time() - t, 1)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
