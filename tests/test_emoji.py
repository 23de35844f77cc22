"""The emoji image set builder (stellar_tok.data.emoji, stellar_tok.make_emoji), run on a stand-in: a small
emoji-test.txt of symbols that matplotlib's DejaVu Sans draws, so no Debian font package is needed. Then the
shards it writes go through the wds data path, the trainer's config for them and the evaluation."""
import json
import os

import matplotlib
import pytest
import torch
from PIL import ImageFont

from stellar_tok.data.emoji import Emoji, build_emoji_shards, parse_emoji_test, render_emoji, split_of

from conftest import make_tiny_tokenizer

DEJAVU = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
GROUPS = {  # group -> code points DejaVu Sans draws
    "Cards": ["2660", "2663", "2665", "2666", "2664", "2667", "2661", "2662"],
    "Chess": ["2654", "2655", "2656", "2657", "2658", "2659", "265A", "265B", "265C", "265D", "265E", "265F"],
    "Weather": ["2600", "2601", "2602", "2603", "2604", "2605", "2606", "2607"],
}


def fake_emoji_test(path):
    lines = ["# emoji-test.txt", "# Version: 15.0", ""]
    for group, points in GROUPS.items():
        lines += [f"# group: {group}", f"# subgroup: {group.lower()}-all"]
        lines += [f"{p}  ; fully-qualified  # x E1.0 symbol {p}" for p in points]
        lines.append(f"{points[0]} FE0E ; minimally-qualified # x E1.0 text style {points[0]}")  # not fully qualified: left out
    lines += ["# group: Cards", "# subgroup: toned", "2660 1F3FB ; fully-qualified # x E1.0 symbol: light skin tone"]
    lines += ["# group: Component", "# subgroup: skin-tone", "1F3FB ; fully-qualified # x E1.0 light skin tone", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def build(tmp_path, name="set", **kw):
    kw = {"size": 32, "val_percent": 50, "font_size": 48, "require_layout": False, **kw}
    return build_emoji_shards(str(tmp_path / name), font_path=DEJAVU, emoji_test_path=fake_emoji_test(tmp_path / "emoji-test.txt"), **kw)


def test_parse_keeps_fully_qualified_with_group_and_name(tmp_path):
    found = parse_emoji_test(open(fake_emoji_test(tmp_path / "t.txt"), encoding="utf-8").read())
    assert len(found) == 8 + 12 + 8 + 1 + 1  # the text-style lines are left out; the toned one and the component stay
    assert found[0] == Emoji("Cards", "cards-all", "\u2660", "symbol 2660")
    toned = next(e for e in found if e.subgroup == "toned")
    assert toned.base == "\u2660" and toned.key == "2660-1f3fb"


def test_split_is_a_fixed_hash_shared_by_tone_variants():
    plain, toned = Emoji("A", "a", "\u270b", "hand"), Emoji("A", "b", "\u270b\U0001F3FD", "hand: tone")
    splits = {split_of(Emoji("A", "a", chr(0x2600 + i), "x"), 30) for i in range(64)}
    assert splits == {"train", "val"}
    assert split_of(plain, 30) == split_of(toned, 30)  # variants of one emoji never straddle the split
    assert split_of(plain, 0) == "train" and split_of(plain, 100) == "val"


def test_render_is_square_centred_on_white():
    font = ImageFont.truetype(DEJAVU, 48)
    image = render_emoji(font, "\u2660", 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    x = torch.tensor(list(image.getdata()), dtype=torch.float32).view(32, 32, 3)
    assert all((x[i, j] == 255).all() for i in (0, -1) for j in (0, -1))  # the corners are background
    ink = (x.mean(-1) < 128).nonzero().float()
    assert abs(ink[:, 0].mean().item() - 15.5) < 3 and abs(ink[:, 1].mean().item() - 15.5) < 3  # centred
    assert render_emoji(font, " ", 32) is None  # nothing drawn


def test_build_writes_labelled_shards_that_the_data_path_reads(tmp_path):
    from stellar_tok.data import build_dataset

    summary = build(tmp_path)
    out = tmp_path / "set"
    assert json.loads((out / "classes.json").read_text()) == ["Cards", "Chess", "Weather"]  # Component dropped
    assert summary["skipped"]["tone_variant"] == 1 and summary["train"] + summary["val"] == 28
    assert sorted(os.listdir(out)) == ["classes.json", "dataset.json", "train-000000.tar", "val-000000.tar"]
    assert json.loads((out / "dataset.json").read_text()) == summary
    for split in ("train", "val"):
        items = list(build_dataset({"name": "wds", "path": str(out), "resolution": 32}, split)) if split == "val" else None
        if items is None:  # train streams forever: read one epoch's worth
            ds = build_dataset({"name": "wds", "path": str(out), "resolution": 32, "epoch_size": summary["train"]}, split)
            items = list(ds)
        labels = [label for _, label in items]
        assert len(items) == summary[split]
        assert all(image.shape == (3, 32, 32) and image.dtype == torch.uint8 for image, _ in items)
        assert all(0 < image.float().std() for image, _ in items)  # something was drawn
        if split == "val":
            assert sorted(labels) == sorted(c for c, n in enumerate(summary["counts"]["val"]) for _ in range(n))


def test_rebuild_is_byte_identical_and_refuses_to_overwrite(tmp_path):
    from stellar_tok.data import DataError

    build(tmp_path, "a")
    build(tmp_path, "b")
    for name in ("train-000000.tar", "val-000000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(DataError, match="overwrite=true"):
        build(tmp_path, "a")
    assert build(tmp_path, "a", tones=True, overwrite=True)["train"] + build(tmp_path, "a", tones=True, overwrite=True)["val"] == 29


def test_missing_sources_name_the_packages(tmp_path, capsys):
    from stellar_tok.make_emoji import main

    with pytest.raises(SystemExit) as stop:
        main([f"out={tmp_path / 'x'}", f"font={tmp_path / 'nope.ttf'}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install fonts-noto-color-emoji" in err


def test_evaluate_reads_every_image_of_the_shards(tmp_path):
    """n_eval=0 and n_train=0 on shards (whose length is known only once read) probe every image."""
    from stellar_tok.evaluate import main

    summary = build(tmp_path)
    make_tiny_tokenizer(tmp_path / "tokenizer")
    report = main([f"tokenizer={tmp_path / 'tokenizer'}", f"out={tmp_path / 'eval'}", "data.name=wds", f"data.path={tmp_path / 'set'}",
                   "tasks=linear,knn", "n_eval=0", "n_train=0", "probe_epochs=2", "progress=false"])
    assert report["data"]["n_eval"] == summary["val"] and report["data"]["n_train"] == summary["train"]
    assert report["results"]["pixels"]["knn_pixels"] * summary["val"] / 100 == pytest.approx(
        round(report["results"]["pixels"]["knn_pixels"] * summary["val"] / 100), abs=1e-3)


def test_emoji_configs_load_and_compress_tenfold():
    from stellar_tok import StellarTokenizer
    from stellar_tok.config import load_config, tokenizer_kwargs

    for name in ("emoji64_cpu", "emoji64_gpu"):
        cfg = load_config([f"config=configs/tokenizer/{name}.yaml"])
        assert (cfg.data.name, cfg.data.path, cfg.data.resolution, cfg.model.image_size) == ("wds", "data/emoji64", 64, 64)
        tok = StellarTokenizer(**tokenizer_kwargs(cfg.model))
        n = (cfg.model.image_size // cfg.model.patch_size) ** 2
        assert 64 * 64 * 3 / tok.latent_values(n) >= 10
