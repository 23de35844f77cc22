"""Checkpoints that survive any kill, resumes that continue exactly, and exports that are never half-written.

A checkpoint is a folder `OUT/checkpoints/step-XXXXXXX/` holding

    model*.safetensors, optimizer*.bin, random_states_*.pkl   accelerate's `save_state` (models, optimizers, the
                                                              global RNGs of every process)
    trainer_state.json, trainer_state.safetensors             this project's state: step and data position,
                                                              LR scheduler, EMA weights, each process's view/noise
                                                              RNG (JSON and safetensors: nothing to unpickle)
    manifest.json                                             size and SHA-256 of every file above, written last

Writing is atomic: everything goes to `step-XXXXXXX.tmp/`, every file is fsynced, the manifest is written and
fsynced, then the folder is renamed to its final name and the parent folder fsynced. A kill at any moment
leaves either the previous checkpoints or the new one, never a half-written folder under a final name. The
newest `keep` checkpoints are kept. A save that fails (a full disk) removes its `.tmp` folder and leaves the
previous checkpoints as they were; a full disk stops the run with one line naming the folder and the space it needs.
Exports are written the same way.

Reading checks the manifest first: a folder whose files are missing, truncated or changed is refused (with
`resume=auto`, skipped with a warning for the next older one). Only then does accelerate load it, and every
`torch.load` it makes is `weights_only=True`. A folder without this project's manifest is never loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import warnings

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from stellar_tok.errors import UserError
from stellar_tok.files import atomic_write_json, fsync_dir, writing_folder

MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_NAME = re.compile(r"^step-\d{7}$")
_RESUME_HINT = "the previous checkpoints are kept: free some space, then continue with train.resume=auto"


class TrainState:
    """The counters of a run, saved with every checkpoint."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already used (the data position)
        self.images_seen = 0
        self.nonfinite = 0  # non-finite losses in a row
        self.nonfinite_total = 0  # steps skipped for a non-finite loss, over the whole run
        self.wall_s = 0.0  # training time spent so far, over every resume (the time budget's clock)
        self.cpu_s = 0.0
        self.skipped = {}  # bad data samples skipped, by reason

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def _sha256(f) -> str:
    """SHA-256 of an open binary file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> str:
    """fsync one file and return its SHA-256."""
    with open(path, "rb") as f:
        digest = _sha256(f)
        os.fsync(f.fileno())
    return digest


def fsync_tree(root: str) -> dict[str, dict]:
    """fsync every file and folder below `root`; returns {relative path: {size, sha256}}."""
    files = {}
    for folder, _, names in os.walk(root):
        for n in sorted(names):
            p = os.path.join(folder, n)
            files[os.path.relpath(p, root)] = {"size": os.path.getsize(p), "sha256": _fsync_file(p)}
        fsync_dir(folder)
    return files


def _remove(path: str) -> None:
    """Rename out of the way first, so a kill during the deletion never leaves a half-deleted checkpoint
    under a valid name."""
    trash = path + ".del"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _split_tensors(obj, tensors: dict, prefix: str):
    """Nested dicts/lists with tensors -> the same structure with {"__tensor__": key}; tensors collected."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# finding and checking
# ----------------------------------------------------------------------------------------------


def find_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoint folders that are complete (they have a manifest), oldest first. Not yet verified."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if _NAME.match(n) and os.path.isfile(os.path.join(ckpt_dir, n, MANIFEST)))
    return [os.path.join(ckpt_dir, n) for n in names]


def verify_checkpoint(path: str, hashes: bool = True) -> str | None:
    """None when every file of the manifest is there with its size (and SHA-256); else what is wrong."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return f"{path} has no {MANIFEST}: not a complete checkpoint of this project"
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({type(e).__name__})"
    for rel, meta in files.items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            return f"{p} is missing"
        if os.path.getsize(p) != meta["size"]:
            return f"{p} has {os.path.getsize(p)} bytes, the manifest says {meta['size']}"
        if hashes:
            with open(p, "rb") as f:
                digest = _sha256(f)
            if digest != meta["sha256"]:
                return f"{p} does not match its SHA-256 in the manifest (corrupt or changed)"
    return None


def latest_valid_checkpoint(ckpt_dir: str) -> str | None:
    """The newest checkpoint that verifies; newer broken ones are reported and skipped."""
    for path in reversed(find_checkpoints(ckpt_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}")
    return None


# ----------------------------------------------------------------------------------------------
# the checkpointer of a training run
# ----------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly.

        ckpt = Checkpointer(accelerator, out_dir, keep=3, state=state, rng=gen, scheduler=sched, ema=ema)
        ckpt.resume("auto")         # or None, or a checkpoint folder
        ckpt.save()                 # -> OUT/checkpoints/step-XXXXXXX

    `accelerator.prepare`d models and optimizers go through accelerate; `objects` (anything with
    state_dict/load_state_dict whose state is tensors, numbers, strings, lists and dicts) and `rng` (one
    torch.Generator per process) go to trainer_state.json/.safetensors."""

    def __init__(self, accelerator, out_dir: str, keep: int, state: TrainState, rng: torch.Generator | None = None, **objects):
        self.accelerator = accelerator
        self.dir = os.path.join(out_dir, "checkpoints")
        self.keep = keep
        self.state = state
        self.rng = rng
        self.objects = {"state": state, **objects}

    # --- save -----------------------------------------------------------------------------
    def save(self) -> str:
        acc = self.accelerator
        final = os.path.join(self.dir, f"step-{self.state.step:07d}")
        tmp = final + ".tmp"
        rngs = [self.rng.get_state()] if self.rng is not None else []
        if acc.num_processes > 1:  # every process's generator, in process order
            rngs = gather_object(rngs)
        if acc.is_main_process:
            os.makedirs(self.dir, exist_ok=True)
            for n in os.listdir(self.dir):  # left by a run killed while saving or deleting
                if n.endswith(".tmp") or n.endswith(".del"):
                    shutil.rmtree(os.path.join(self.dir, n), ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        with writing_folder(tmp, final, self._bytes_needed, _RESUME_HINT):  # a failed save leaves no .tmp behind
            self._write(tmp, final, rngs)
        acc.wait_for_everyone()
        return final

    def _write(self, tmp: str, final: str, rngs: list) -> None:
        """Every process's files into `tmp`; the main process adds the manifest and renames it onto `final`."""
        acc = self.accelerator
        acc.save_state(tmp)
        if acc.is_main_process:
            tensors: dict = {}
            meta = _split_tensors({k: o.state_dict() for k, o in self.objects.items()}, tensors, "o")
            meta["rng"] = _split_tensors(rngs, tensors, "rng")
            meta["num_processes"] = acc.num_processes
            save_file(tensors, os.path.join(tmp, STATE_TENSORS))
            with open(os.path.join(tmp, STATE_JSON), "w") as f:
                json.dump(meta, f, indent=1)
        acc.wait_for_everyone()  # every process's files are written
        if acc.is_main_process:
            files = fsync_tree(tmp)
            atomic_write_json(os.path.join(tmp, MANIFEST), {"step": self.state.step, "time": time.time(), "files": files})
            if os.path.exists(final):
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            for old in find_checkpoints(self.dir)[: -self.keep]:
                _remove(old)

    def _bytes_needed(self) -> int:
        """About what a checkpoint writes: the size of the newest one, else the weights and two Adam moments."""
        done = find_checkpoints(self.dir)
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            with open(os.path.join(done[-1], MANIFEST)) as f:
                return sum(m["size"] for m in json.load(f)["files"].values())
        return 3 * sum(p.numel() * p.element_size() for m in self.accelerator._models for p in m.parameters())

    # --- resume ---------------------------------------------------------------------------
    def resume(self, resume: str | None) -> str | None:
        """`resume`: None (start fresh), "auto" (the newest valid checkpoint, if any) or a checkpoint folder."""
        if not resume:
            return None
        if resume == "auto":
            path = latest_valid_checkpoint(self.dir)
            if path is None:
                return None
        else:
            path = resume
            problem = verify_checkpoint(path)
            if problem is not None:
                raise UserError(f"train.resume: {problem}")
        with open(os.path.join(path, STATE_JSON)) as f:
            meta = json.load(f)
        state = _join_tensors(meta, load_file(os.path.join(path, STATE_TENSORS)))
        if state["num_processes"] != self.accelerator.num_processes:
            warnings.warn(f"{path} was written by {state['num_processes']} processes, resuming with "
                          f"{self.accelerator.num_processes}: data order and random streams will differ from an uninterrupted run")
        self.accelerator.load_state(path)
        for k, o in self.objects.items():
            o.load_state_dict(state[k])
        i = self.accelerator.process_index
        if self.rng is not None and i < len(state["rng"]):
            self.rng.set_state(state["rng"][i].to("cpu"))
        self.accelerator.print(f"resumed from {path} at step {self.state.step}")
        return path


# ----------------------------------------------------------------------------------------------
# exports
# ----------------------------------------------------------------------------------------------


def export_pretrained(model, out_dir: str, name: str, extra_json: dict | None = None) -> str:
    """`save_pretrained` (safetensors + JSON) into `out_dir/name.tmp`, fsynced, then renamed onto `out_dir/name`:
    readers see the old export or the new one, never a half-written folder. `extra_json`: {file name: object}
    written beside the weights (e.g. how the model was trained)."""
    final = os.path.join(out_dir, name)
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_folder(tmp, final, lambda: _weight_bytes(model), "the checkpoint is written: free some space, then rerun "
                        "with train.resume=auto to export it"):
        model.save_pretrained(tmp, safe_serialization=True)
        for fname, obj in (extra_json or {}).items():
            with open(os.path.join(tmp, fname), "w") as f:
                json.dump(obj, f, indent=1)
        fsync_tree(tmp)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _weight_bytes(model) -> int:
    """Bytes of the weights of a model, or of a pipeline's models: about what its export writes."""
    parts = [model] if isinstance(model, torch.nn.Module) else [c for c in getattr(model, "components", {}).values()
                                                                 if isinstance(c, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in parts for t in [*m.parameters(), *m.buffers()])


def epoch_batches(loader, state: TrainState, accelerator, skip: bool = True):
    """Endless batches, epoch after epoch. After a resume the batches already used in the current epoch are
    skipped, so the data order continues exactly (`skip`: the loader was prepared by accelerate with a
    seedable sampler; webdataset streams cannot be replayed and are not skipped)."""
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        if hasattr(getattr(loader, "dataset", None), "set_epoch"):  # per-sample views (stellar_tok.data.crops); accelerate
            loader.dataset.set_epoch(state.epoch)                   # tells the data set only when its sampler cannot hear it
        it = accelerator.skip_first_batches(loader, state.batch_in_epoch) if skip and state.batch_in_epoch else loader
        for batch in it:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0
