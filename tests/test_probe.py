"""The probe command: the cached protocol against numbers of the code before protocol= existed, the augmented
(reference) protocol end to end on in-memory, folder and wds data, its crops changing across epochs and its
evaluation deterministic, and subsets spread over the classes of a class-sorted listing."""
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import data_cfg
from PIL import Image

from stellar_tok.data import build_dataset
from stellar_tok.probe import main
from stellar_tok.data.reference import spread_subset
from stellar_tok.evaluation.augmented_probe import augmented_probe
from stellar_tok.evaluation.probe_images import split_batches
from stellar_tok.evaluation.probing import run_probes

pytestmark = pytest.mark.filterwarnings("ignore:skipping a bad sample:UserWarning")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """train/ and val/ with 4 class sub-folders of non-square images (so listings are sorted by class)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, per in (("train", 6), ("val", 3)):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per):
                arr = rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)
                arr[..., c % 3] = 60 * c  # a class cue
                Image.fromarray(arr).save(root / split / f"c{c}" / f"{i}.png")
    return root


# ------------------------------------------------------------------ cached protocol: unchanged
# Computed with stellar_tok/probe.py before protocol= existed (same tiny tokenizer, CPU, 2 threads).
BEFORE = {"linear_tokens": 16.0, "knn_tokens": 13.0, "linear_cls": 15.0, "knn_cls": 15.0, "linear_pixels": 10.0,
          "knn_pixels": 17.0, "n_train": 200, "n_val": 100}


def test_cached_protocol_unchanged(tiny_tokenizer, tokenizer_dir, capsys):
    cfg = data_cfg(name="shapes", train_size=200, val_size=100)
    assert run_probes(tiny_tokenizer, cfg, ("tokens", "cls", "pixels"), epochs=3) == BEFORE
    res = main([f"tokenizer={tokenizer_dir}", "data.name=shapes", "data.train_size=200", "data.val_size=100", "epochs=3",
                "features=tokens,cls,pixels", "device=cpu", "progress=false"])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert {k: res[k] for k in BEFORE} == BEFORE
    assert res["protocol"] == "cached" and res["n_eval"] == 100
    assert "protocol=cached n_train=200 (train split, all) n_eval=100 (val split, all)" in err


# ------------------------------------------------------------------ augmented protocol
def test_augmented_crops_differ_across_epochs_and_eval_is_deterministic(tiny_tokenizer):
    cfg = data_cfg(name="shapes", train_size=48, val_size=32)
    seen = {}  # (epoch, index) -> (pixels the head saw, tokens feature)

    def record(epoch, f, labels, indices):
        for i, j in enumerate(indices.tolist()):
            seen[epoch, j] = (f["pixels"][i].clone(), f["tokens"][i].clone())

    kw = dict(kinds=("tokens", "pixels"), epochs=2, batch_size=16, seed=3)
    first = augmented_probe(tiny_tokenizer, cfg, on_batch=record, **kw)
    assert {j for e, j in seen if e == 0} == {j for e, j in seen if e == 1} == set(range(48))  # the whole split each epoch
    originals = torch.stack([img for img, _ in build_dataset(cfg, "train")]).float().flatten(1) / 127.5 - 1
    moved = sum(not torch.equal(seen[0, j][0], seen[1, j][0]) for j in range(48))
    tokens_moved = sum(not torch.allclose(seen[0, j][1], seen[1, j][1]) for j in range(48))
    not_original = sum(not torch.equal(seen[e, j][0], originals[j]) for e in (0, 1) for j in range(48))
    assert moved >= 45 and tokens_moved >= 45 and not_original >= 90  # fresh crops + flips, not the plain image
    assert seen[0, 0][0].shape == (3 * 32 * 32,)

    second = augmented_probe(tiny_tokenizer, cfg, **kw)
    assert second == first  # same seed: same crops, same head, same centre-crop evaluation
    assert set(first) == {"linear_tokens", "linear_pixels", "knn_tokens", "knn_pixels", "n_train", "n_val"}
    assert first["n_train"] == 48 and first["n_val"] == 32
    # the evaluation reads the held-out images as they are (centre crops at the tokenizer's size), twice the same
    a, b = (torch.cat([x for x, _ in split_batches(cfg, "val", 0, 16)]) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(a, torch.stack([img for img, _ in build_dataset(cfg, "val")]))


def test_augmented_cli_on_folder_data(class_folder, tokenizer_dir, capsys):
    res = main([f"tokenizer={tokenizer_dir}", "data.name=folder", f"data.path={class_folder}", "protocol=augmented",
                "epochs=2", "batch_size=8", "n_eval=8", "features=tokens", "device=cpu", "progress=false"])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert res["protocol"] == "augmented" and res["n_train"] == 24 and res["n_eval"] == 8
    assert res["settings"]["crop_scale"] == [0.2, 1.0] and res["settings"]["image_size"] == 32
    for k in ("linear_tokens", "knn_tokens"):  # top-1 over the 8 held-out images: a whole number of them
        assert res[k] * 8 / 100 == pytest.approx(round(res[k] * 8 / 100), abs=1e-6), (k, res[k])
    assert "protocol=augmented n_train=24 (train split, all) n_eval=8 of 12 (val split, seeded subset spread over the classes)" in err


def test_augmented_on_wds_shards(class_folder, tiny_tokenizer, tmp_path):
    from stellar_tok.data.shard_writer import make_shards

    for split in ("train", "val"):
        make_shards(str(class_folder / split), str(tmp_path), shard_size=8, prefix=split, progress=False)
    cfg = data_cfg(name="wds", path=str(tmp_path), epoch_size=20)
    shapes = []
    res = augmented_probe(tiny_tokenizer, cfg, ("tokens",), epochs=2, batch_size=8, knn=False,
                          on_batch=lambda e, f, y, idx: shapes.append((f["tokens"].shape[0], int(idx.max()))))
    assert res["n_train"] == 20 and res["n_val"] == 12 and "knn_tokens" not in res
    assert sum(n for n, _ in shapes) == 40 and all(i == -1 for _, i in shapes)


def test_cached_features_read_centre_crops_of_each_image_once_never_the_training_stream(class_folder, tmp_path):
    """The cached protocol (and the kNN of the augmented one) on folder and wds data: the train split as centre crops,
    the same twice, every image once; wds subsets spread over the classes, not the first n of a resampled stream."""
    from stellar_tok.data import load_rgb, resize_and_crop
    from stellar_tok.data.shard_writer import make_shards

    cfg = data_cfg(name="folder", path=str(class_folder))
    folder = build_dataset(cfg, "train")
    centre = torch.stack([resize_and_crop(load_rgb(folder.path(i), target=32), 32, False) for i in range(len(folder))])
    a, b = (torch.cat([x for x, _ in split_batches(cfg, "train", 0, 5)]) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(a, centre)
    assert folder.random_crop  # the training set passed in is left as it was
    assert torch.equal(torch.cat([x for x, _ in split_batches(cfg, "train", 0, 5, dataset=folder)]), centre)
    assert folder.random_crop

    make_shards(str(class_folder / "train"), str(tmp_path), shard_size=8, prefix="train", progress=False)
    make_shards(str(class_folder / "val"), str(tmp_path), shard_size=8, prefix="val", progress=False)
    shards = data_cfg(name="wds", path=str(tmp_path), epoch_size=40)  # an epoch longer than the split: the stream resamples
    images, labels = (torch.cat(t) for t in zip(*split_batches(shards, "train", 0, 5)))
    assert len(labels) == 24 and Counter(labels.tolist()) == {c: 6 for c in range(4)}
    assert sorted(map(bytes, images.flatten(1).numpy())) == sorted(map(bytes, centre.flatten(1).numpy()))
    few = torch.cat([y for _, y in split_batches(shards, "train", 8, 4)])
    assert Counter(few.tolist()) == {c: 2 for c in range(4)}  # the shards are class-sorted: the first 8 hold 2 classes


def test_cli_rejects_unknown_keys_and_documents_protocols(capsys):
    for bad in (["bogus=1"], ["data.bogus=1"], ["protocol=fancy"], ["features=tokens,nope"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err and "protocol must be one of cached, augmented" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "protocol: cached" in help_text and "augmented (the reference's linear-probe protocol" in help_text
    assert "RandomResizedCrop (scale 0.2-1" in help_text and "cosine" in help_text


# ------------------------------------------------------------------ subsets
def test_spread_subset_balanced_seeded_and_whole():
    sorted_labels = np.repeat(np.arange(10), 100)  # a class-sorted listing, like an ImageNet folder
    pick = spread_subset(sorted_labels, 50, seed=0)
    assert Counter(sorted_labels[pick].tolist()) == {c: 5 for c in range(10)}
    assert pick == sorted(pick) and len(set(pick)) == 50
    assert pick == spread_subset(sorted_labels, 50, seed=0) != spread_subset(sorted_labels, 50, seed=1)
    uneven = np.repeat(np.arange(3), [600, 300, 100])  # in proportion to the class sizes
    assert Counter(uneven[spread_subset(uneven, 100, seed=2)].tolist()) == {0: 60, 1: 30, 2: 10}
    assert spread_subset(sorted_labels, 0) == spread_subset(sorted_labels, 5000) == list(range(1000))


def test_folder_subset_spread_over_classes(class_folder, tiny_tokenizer):
    cfg = data_cfg(name="folder", path=str(class_folder))
    listing = build_dataset(cfg, "train").labels
    assert len(set(listing[:8].tolist())) == 2  # the first 8 of the listing would see 2 of the 4 classes
    labels = torch.cat([y for _, y in split_batches(cfg, "train", 8, 4, seed=0)])
    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    res = run_probes(tiny_tokenizer, cfg, ("pixels",), epochs=1, n_train=8, n_eval=4)
    assert res["n_train"] == 8 and res["n_val"] == 4


def test_an_untrained_cls_is_labelled(tokenizer_dir, capsys):
    """A tokenizer whose training.json says no loss reached CLS: the probe's result and its stderr say so."""
    with open(os.path.join(tokenizer_dir, "training.json"), "w") as f:
        json.dump({"steps": 1, "cls_trained": False}, f)
    args = [f"tokenizer={tokenizer_dir}", "data.name=shapes", "data.train_size=40", "data.val_size=20", "epochs=1", "device=cpu", "progress=false"]
    res = main(args + ["features=tokens,cls"])
    assert res["cls_untrained"] is True and "untrained CLS" in capsys.readouterr().err
    assert "cls_untrained" not in main(args + ["features=tokens"])
