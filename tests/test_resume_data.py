"""Resume and faults with file-backed data: the views a loader's workers cut are drawn from a seed of (run seed,
epoch, sample), so a resumed run on an image folder with loader workers logs the same losses as an uninterrupted
one; a shard cut short while it is streamed costs its remaining samples, counted, never the run.
docs/RELIABILITY.md lists what each test guarantees."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from omegaconf import OmegaConf

from stellar_tok.data import SkipCounter, build_loader, tar_samples
from stellar_tok.train import main
from stellar_tok.training.checkpoint import TrainState, epoch_batches
from conftest import data_cfg

TINY = [
    "config=configs/tokenizer/tiny.yaml",
    "model.width=32", "model.depth=1", "model.heads=2", "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "align.head_hidden=64", "optim.batch_size=8", "optim.warmup_steps=2", "train.log_every=1", "train.progress=false",
    "train.stats_batches=1", "train.image_every=1000",
]
VIEWS = dict(global_size=32, global_crops=2, local_crops=2, local_size=16, global_scale=(0.3, 1.0), local_scale=(0.1, 0.4),
             rotation=180.0)


def _image_folder(root, n: int = 32) -> str:
    """n random RGB images of a few sizes, larger than the views, so every crop box shows in the pixels."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        w, h = (48, 40, 64)[i % 3], (40, 56, 48)[i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:03d}.png"))
    return str(root)


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def test_views_are_the_same_whatever_the_workers(tmp_path):
    """The trainers' batches (`epoch_batches`) of an image folder hold the same views with 0 or 2 persistent loader
    workers, epoch after epoch; each is the view seeded by (seed, epoch, index), new in each epoch."""
    cfg = data_cfg(name="folder", path=_image_folder(tmp_path / "imgs", 16), seed=3)

    def three_epochs(workers):  # 16 images in file order, 2 batches an epoch
        loader = build_loader(cfg, 8, "train", num_workers=workers, shuffle=False, seed=3, views=OmegaConf.create(VIEWS))
        return [b[0]["local"] for b, _ in zip(epoch_batches(loader, TrainState(), None, skip=False), range(6))], loader

    (a, loader), (b, _) = three_epochs(0), three_epochs(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    cropper = loader.dataset.cropper
    for epoch in range(3):
        cropper.set_epoch(epoch)
        assert torch.equal(a[2 * epoch][5], cropper(loader.dataset.path(5), sample=5)["local"])  # image 5 in this epoch
    assert not torch.equal(a[0], a[2]) and not torch.equal(a[2], a[4])


def test_resume_is_exact_on_an_image_folder_with_workers(tmp_path):
    """tiny.yaml on an image folder with 2 loader workers: stopped at its step-3 checkpoint and resumed, it logs
    the same loss at each of the 6 steps as a run that was never stopped (16 images, 4 batches an epoch: the
    resume lands mid-epoch and the run goes on into the second epoch)."""
    folder = _image_folder(tmp_path / "imgs", 16)
    common = TINY + ["data.name=folder", f"data.path={folder}", "data.num_workers=2", "optim.batch_size=4", "train.steps=6",
                     "train.ckpt_every=3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(common + [f"train.output_dir={a}"])
    main(common + ["train.stop_after=3", f"train.output_dir={b}"])
    main(common + ["train.resume=auto", f"train.output_dir={b}"])
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-6, abs=1e-6), (s, la[s], lb[s])


def _shards(folder, names, n: int = 8) -> list[str]:
    """WebDataset shards `names` in `folder`, n 40x40 PNG samples each (labels 0/1)."""
    import io

    import webdataset as wds

    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        paths.append(os.path.join(folder, name))
        with wds.TarWriter(paths[-1], encoder=False) as writer:
            for i in range(n):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, format="PNG")
                writer.write({"__key__": f"{name[:-4]}-{i:03d}", "png": png.getvalue(), "cls": str(i % 2).encode()})
    return paths


def _cut_mid_file(path) -> None:
    """Cut a tar inside the data of its middle member: the samples before it read, then a read error."""
    import tarfile

    with tarfile.open(path) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    with open(path, "r+b") as f:
        f.truncate(middle.offset_data + middle.size // 2)


def test_a_shard_cut_while_it_is_read_loses_only_its_rest(tmp_path):
    """The shard reader holds a shard open when the file is cut in the middle: the samples read before stay, the
    rest of the shard is skipped with a warning naming it and counted once as bad_shard; the next shard is read."""
    cut, good = _shards(tmp_path, ["cut.tar", "good.tar"])
    skips = SkipCounter()
    stream = tar_samples([{"url": cut}, {"url": good}], skips=skips)
    first = next(stream)
    _cut_mid_file(cut)
    with pytest.warns(UserWarning, match="skipping unreadable shard .*cut.tar"):
        rest = [s["__key__"] for s in stream]
    assert first["__key__"] == "cut-000"
    assert 0 < sum(k.startswith("cut-") for k in rest) < 7 and sum(k.startswith("good-") for k in rest) == 8
    assert skips.counts() == {"bad_shard": 1}


def test_a_shard_cut_mid_file_on_one_of_two_processes_is_skipped_and_counted(tmp_path):
    """Two gloo processes stream WebDataset shards, each from its own local copy (data.path names the rank); rank 1's
    copy of one shard is cut in the middle of a member: rank 1 skips the rest of that shard, counted as bad_shard,
    at every pass over it, and both processes run every step; the run's summary holds the count."""
    from conftest import launch_two_processes
    from stellar_tok.training.checkpoint import find_checkpoints

    for rank in (0, 1):
        _shards(tmp_path / f"rank{rank}", ["train-000000.tar", "train-000001.tar"])
    _cut_mid_file(tmp_path / "rank1" / "train-000001.tar")
    out = str(tmp_path / "run")
    path = str(tmp_path / "rank${oc.env:RANK}" / "train-{000000..000001}.tar")  # each process: its own copy
    res = launch_two_processes("stellar_tok.train", [*TINY, "data.name=wds", f"data.path={path}", "data.epoch_size=64",
                                                     "data.num_workers=2", "train.steps=6", "train.ckpt_every=1000",
                                                     f"train.output_dir={out}"], 29551)
    ckpts = find_checkpoints(os.path.join(out, "checkpoints"))
    assert ckpts and os.path.basename(ckpts[-1]) == "step-0000006", res.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 6 and summary["images_seen"] == 6 * 8 * 2
    assert set(summary["skipped_samples"]) == {"bad_shard"} and summary["skipped_samples"]["bad_shard"] >= 1, summary
    warned = [line for line in res.stderr.splitlines() if "UserWarning: skipping unreadable shard" in line]
    assert warned and all(os.path.join("rank1", "train-000001.tar") in line for line in warned), warned
