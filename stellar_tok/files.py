"""Files that are never half-written, and weights that are never unpickled.

Writing: every file this project writes goes to a temporary name in the same folder, is fsynced, then renamed onto
its final name (`os.replace`, atomic on POSIX) and the folder fsynced. A reader sees the old file or the new one,
never a partial one; a writer that raises (or a kill) leaves the old file untouched and no temporary behind
(a kill may leave a `*.tmp` beside it, which the next writer of that folder may remove).

    with atomic_path("out/x.safetensors") as tmp:    # for writers that take a path (save_file, tarfile, zipfile)
        save_file(tensors, tmp)
    atomic_write_json("out/manifest.json", {...})    # and atomic_write_text, atomic_write_bytes
    with writing_folder("out/ckpt.tmp", "out/ckpt", needed=lambda: 2**30):   # a folder written whole or not at all
        ...                                          # (removed if the block raises; a full disk: one line)

Loading: weights are read from safetensors, or with `torch.load(..., weights_only=True)`; never unpickled with code
execution. `load_state_dict_file` (one weight file), `SafetensorsOnly` (a mixin for `diffusers` models),
`safetensors_only_kwargs` (for pipelines) and `weights_only_loads` (for libraries that call `torch.load` themselves)
hold that policy; models import it from here without importing any training code.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file

from .errors import UserError

# ----------------------------------------------------------------------------------------------
# atomic writing
# ----------------------------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    """fsync a folder (its entries: a rename into it survives a crash); a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask. Read from /proc where it can be (Linux): setting it to read it back, the fallback,
    briefly changes it for every thread of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file name beside `path` for a writer that takes a path; when the block ends normally the
    file is fsynced, given the permissions of any file the user writes (umask), and renamed onto `path`. When the
    block raises, the temporary file is removed and `path` is left as it was. The folder is created if needed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make files 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str, obj, indent: int | None = 1, **kwargs) -> None:
    """`json.dump(obj)` to `path` atomically (see `atomic_path`); `kwargs` go to json.dump (e.g. sort_keys)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, **kwargs)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent); None if unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    """'1.5 GB', '20.0 MB', '512 B'; 'unknown' for None."""
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def writing_folder(tmp: str, path: str, needed, hint: str = ""):
    """For a folder written under the temporary name `tmp` and renamed onto `path` within the block: when the block
    raises, `tmp` is removed (nothing half-written is left) and a full disk (ENOSPC, EDQUOT) becomes a `UserError`
    of one line naming `path`, the space it needs (`needed()`: an estimate in bytes) and the space free, then `hint`."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise UserError(f"no space left on the device writing {path}: it needs about {human_bytes(needed())}, "
                            f"{human_bytes(free_bytes(path))} free{'; ' + hint if hint else ''}") from e
        raise


# ----------------------------------------------------------------------------------------------
# loading weights without unpickling
# ----------------------------------------------------------------------------------------------


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file, or from a torch pickle read with `weights_only=True` (tensors and
    plain containers only: never a full unpickle), on the CPU. Raises TypeError when the file holds no dict."""
    if path.endswith(".safetensors"):
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise TypeError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def safetensors_only_kwargs(name: str, kwargs: dict) -> dict:
    """`from_pretrained` keyword arguments with use_safetensors=True (False is refused): no pickle fallback."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"{name} loads safetensors weights only (use_safetensors=False is not supported)")
    return {**kwargs, "use_safetensors": True}


class SafetensorsOnly:
    """Mixin for `diffusers` models: `from_pretrained` reads safetensors + JSON only. A pickled weight file in the
    folder (`*.bin`, `*.pt`) is never opened, even when the safetensors file is missing."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs = safetensors_only_kwargs(cls.__name__, kwargs)
        path = str(pretrained_model_name_or_path)
        folder = os.path.join(path, kwargs.get("subfolder") or "")
        if os.path.isdir(folder) and not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in os.listdir(folder)):
            raise UserError(f"{folder} holds no .safetensors weights: {cls.__name__} loads safetensors + config.json only "
                            "and never unpickles .bin/.pt files (convert them with safetensors.torch.save_file if you trust them)")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every `torch.load` is `weights_only=True`, whatever its caller asks: for libraries
    that unpickle weight files fully (torch.hub's `load_state_dict_from_url`, which torchvision uses for the
    LPIPS backbone, defaults to weights_only=False)."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
