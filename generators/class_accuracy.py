"""Does a class-conditional sample show the requested class? A classifier trained on real images decides.

    python -m generators.class_accuracy samples=samples/tiny/samples.npz data.name=shapes [epochs=3] [cache=runs/classifiers]
    python -m generators.class_accuracy tokenizer=runs/tiny/tokenizer data.name=digits [n=400]   # the ceiling (below)

A small CNN (4 conv blocks, batch norm, global average pooling) is trained with labels on the real train
split (random translations; flips and 90-degree rotations too for shapes), checked on the real val split, cached by data set
under `cache`, then applied to the samples (`arr_0` uint8 NHWC, `arr_1` requested labels, ADM layout).
Reports the real-val accuracy (how far the judge can be trusted) and the fraction of samples classified
as their requested class, overall and per class.

With `tokenizer=DIR` instead of `samples=`, the same judge measures what a generator over that tokenizer's
latent can reach at best: its accuracy on `n` real val images, on their reconstructions decode(encode(x)),
and on two swaps that show which part of the latent carries the class: each image's own L with the tokens S
of another (random) image, and its own S with another image's L, each scored against both images' labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from omegaconf import OmegaConf

from stellar_tok.config import parse_command
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.files import atomic_path, atomic_write_json


@dataclass
class JudgeData:
    """The embedded data set the judge learns from; null keys keep the data set's defaults (and the cache key)."""
    name: str = "shapes"  # shapes | digits
    resolution: int = 32
    train_size: Optional[int] = None  # shapes only
    val_size: Optional[int] = None  # shapes only
    seed: Optional[int] = None


@dataclass
class ClassAccuracyConfig:
    samples: Optional[str] = None  # a samples.npz of generators.sample (arr_0 uint8 NHWC, arr_1 requested labels)
    tokenizer: Optional[str] = None  # instead of samples: the ceiling of a generator over this exported tokenizer
    n: int = 400  # tokenizer=: real val images measured
    data: JudgeData = field(default_factory=JudgeData)
    epochs: int = 3  # the judge's training epochs (part of its cache key)
    cache: Optional[str] = "runs/classifiers"  # where trained judges are kept; null: no cache
    out: Optional[str] = None  # also write the result to this JSON file


def small_cnn(classes: int, width: int = 64) -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    w = width
    return nn.Sequential(block(3, w // 2), nn.MaxPool2d(2), block(w // 2, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                         block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes))


def _augment(x: torch.Tensor, g: torch.Generator, rotate: bool = True) -> torch.Tensor:
    """Flips and 90-degree rotations (for sets whose classes are invariant to them, like shapes) and
    4-pixel translations (reflect-padded), per batch."""
    if rotate:
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(-2, -1))
    pad = 4
    x = F.pad(x, (pad,) * 4, mode="reflect")
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
    return x[..., i : i + x.shape[-2] - 2 * pad, j : j + x.shape[-1] - 2 * pad]


def _to_input(images_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.array(images_uint8_nhwc)).permute(0, 3, 1, 2).float()  # a copy: inputs may be read-only
    return x / 127.5 - 1


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


def train_classifier(data_cfg: dict, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = True):
    """-> (model, real val accuracy %). Trained on the real train split of `data_cfg`."""
    from tqdm.auto import tqdm

    from stellar_tok.data import build_dataset

    tr, va = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val")
    if not hasattr(tr, "images"):
        raise UserError("class_accuracy trains its judge on an embedded data set: data.name=shapes or digits")
    xtr, ytr = _to_input(tr.images), torch.as_tensor(np.array(tr.labels))
    xva, yva = _to_input(va.images), torch.as_tensor(np.array(va.labels))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rotate = data_cfg["name"] == "shapes"  # a digit flipped or turned is another digit (or none)
    model = small_cnn(len(tr.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(xtr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(total=steps, desc="judge", disable=not progress)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(xtr[idx], g, rotate)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    acc = float((predict(model, xva) == yva).float().mean() * 100)
    return model.eval(), acc, list(tr.classes)


def judge(data_cfg: dict, cache: str | None = None, epochs: int = 3, progress: bool = True):
    """The cached classifier for `data_cfg` (trained on first use): (model, real val accuracy %, class names)."""
    key = hashlib.sha256(json.dumps({**data_cfg, "epochs": epochs, "recipe": 2}, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache, f"judge-{data_cfg['name']}-{key}.safetensors") if cache else None
    if path and os.path.exists(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        classes = json.loads(meta["classes"])
        model = small_cnn(len(classes))
        model.load_state_dict(load_file(path))
        return model.eval(), float(meta["val_accuracy"]), classes
    model, acc, classes = train_classifier(data_cfg, epochs=epochs, progress=progress)
    if path:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(model.state_dict(), tmp, metadata={"classes": json.dumps(classes), "val_accuracy": str(acc)})
    return model, acc, classes


def class_accuracy(samples: np.ndarray, labels: np.ndarray, model: nn.Module, classes: list[str]) -> dict:
    pred = predict(model, _to_input(samples)).numpy()
    per = {classes[k]: round(float((pred[labels == k] == k).mean() * 100), 2) for k in np.unique(labels)}
    return {"accuracy": round(float((pred == labels).mean() * 100), 2), "per_class": per, "n": int(len(labels))}


@torch.no_grad()
def ceiling(tokenizer_dir: str, data_cfg: dict, model: nn.Module, classes: list[str], n: int = 400, seed: int = 0) -> dict:
    """Judge accuracy on real val images, their reconstructions, and S/L swaps between images (see module doc)."""
    from stellar_tok import Latent, StellarTokenizer
    from stellar_tok.data import build_dataset
    from stellar_tok.metrics import to_uint8

    tok = StellarTokenizer.from_pretrained(tokenizer_dir).eval()
    ds = build_dataset(data_cfg, "val")
    n = min(n, len(ds))
    images = np.ascontiguousarray(ds.images[:n])  # uint8 NHWC
    labels = ds.labels[:n]
    lat = tok.encode(_to_input(images))
    other = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab_other = labels[other.numpy()]

    def acc(x: torch.Tensor, y: np.ndarray) -> float:
        return class_accuracy(to_uint8(x).permute(0, 2, 3, 1).numpy(), y, model, classes)["accuracy"]

    own_l = tok.decode(Latent(lat.tokens[other], lat.loc))  # S of another image, L of this one
    own_s = tok.decode(Latent(lat.tokens, lat.loc[other]))  # S of this image, L of another
    return {"n": n, "real": class_accuracy(images, labels, model, classes)["accuracy"], "reconstruction": acc(tok.decode(lat), labels),
            "own_L_other_S": {"label_of_L": acc(own_l, labels), "label_of_S": acc(own_l, lab_other)},
            "own_S_other_L": {"label_of_S": acc(own_s, labels), "label_of_L": acc(own_s, lab_other)}}


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_command("python -m generators.class_accuracy", __doc__, ClassAccuracyConfig, argv,
                        "samples=NPZ data.name=shapes | tokenizer=DIR data.name=digits n=400")
    if cfg.tokenizer is not None:
        if not os.path.isfile(os.path.join(cfg.tokenizer, "config.json")):
            raise UserError(f"tokenizer=DIR must name an exported tokenizer folder with config.json (got {cfg.tokenizer!r})")
    elif cfg.samples is None or not os.path.isfile(cfg.samples):
        raise UserError(f"samples=PATH must name a samples.npz (from python -m generators.sample); got {cfg.samples!r}")
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if v is not None}  # unset keys: the data set's defaults
    npz = None if cfg.tokenizer is not None else np.load(cfg.samples)
    if npz is not None and "arr_1" not in npz:
        raise UserError(f"{cfg.samples} has no labels (arr_1): sample with python -m generators.sample")
    t = time.time()
    model, val_acc, classes = judge(data_cfg, cfg.cache, cfg.epochs)
    found = ceiling(cfg.tokenizer, data_cfg, model, classes, cfg.n) if npz is None else \
        class_accuracy(npz["arr_0"], npz["arr_1"], model, classes)
    res = {"judge_val_accuracy": round(val_acc, 2), **found, "seconds": round(time.time() - t, 1)}
    print(json.dumps(res))
    if cfg.out:
        atomic_write_json(cfg.out, res)
    return res


if __name__ == "__main__":
    main()
