"""The class-accuracy judge: a small CNN, trained on the real images of an embedded data set (shapes, digits),
decides whether a class-conditional sample shows the class it was asked for.

    judge           the classifier of a data set, trained on first use and cached: (model, real val accuracy %, class names)
    class_accuracy  the share of samples (uint8 NHWC) it labels as requested, overall and per class
    ceiling         what a generator over a tokenizer's latent can reach at best: the judge on real val images, on
                    their reconstructions, and on S / L swaps between images

The recipe and the command that runs it: `python -m generators.class_accuracy --help`.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stellar_tok.data import build_dataset
from stellar_tok.errors import UserError
from stellar_tok.evaluation.metrics import to_uint8
from stellar_tok.files import atomic_path
from stellar_tok.model.latent import Latent
from stellar_tok.model.tokenizer import StellarTokenizer


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
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        classes = json.loads(meta["classes"])
        model = small_cnn(len(classes))
        model.load_state_dict(load_file(path))
        return model.eval(), float(meta["val_accuracy"]), classes
    model, acc, classes = train_classifier(data_cfg, epochs=epochs, progress=progress)
    if path:
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

    own_l = tok.decode(Latent(lat.z[other], lat.log_loc))  # S of another image, L of this one
    own_s = tok.decode(Latent(lat.z, lat.log_loc[other]))  # S of this image, L of another
    return {"n": n, "real": class_accuracy(images, labels, model, classes)["accuracy"], "reconstruction": acc(tok.decode(lat), labels),
            "own_L_other_S": {"label_of_L": acc(own_l, labels), "label_of_S": acc(own_l, lab_other)},
            "own_S_other_L": {"label_of_S": acc(own_s, labels), "label_of_L": acc(own_s, lab_other)}}
