"""Training views of file-backed data are cut from the decoded original, never from a smaller copy of it."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from stellar_tok.config import ViewsConfig
from stellar_tok.data.crops import ViewCropper
from stellar_tok.data import build_loader
from stellar_tok.data.views import make_views, to_unit_range

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, noise_p=0.0)  # no photometric change: views are the crops


def _views(**kw):
    return OmegaConf.merge(OmegaConf.structured(ViewsConfig), kw)


def _stripes(size: int) -> Image.Image:
    """1-pixel vertical black and white stripes."""
    row = (np.arange(size) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (size, 1))[..., None], 3, axis=2))


def _column_contrast(views: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring columns, on the 0..255 scale."""
    return float((views[..., 1:] - views[..., :-1]).abs().mean() * 127.5)


def test_local_crop_of_a_large_image_keeps_one_pixel_stripes(tmp_path):
    """Through the trainer's path (loader -> make_views): a local crop about its own size in the source keeps the
    source's 1-px stripes; cut from a 288-px copy (the old path) they were averaged to grey."""
    os.makedirs(tmp_path / "data" / "a")
    _stripes(1024).save(tmp_path / "data" / "a" / "stripes.png")
    data = OmegaConf.create({"name": "folder", "path": str(tmp_path / "data"), "resolution": 288, "seed": 0})
    vcfg = _views(global_size=64, global_crops=2, local_crops=3, local_size=32, local_scale=[0.001, 0.001], **PLAIN)
    torch.manual_seed(0)
    images, labels = next(iter(build_loader(data, 1, "train", views=vcfg, drop_last=False)))
    assert set(images) == {"main", "global", "local"} and labels.tolist() == [0]
    assert images["main"].shape == (1, 3, 64, 64) and images["global"].shape == (1, 1, 3, 64, 64)
    assert images["local"].shape == (1, 3, 3, 32, 32)
    views = make_views(to_unit_range(images, "cpu"), vcfg, torch.Generator().manual_seed(0), 8)
    contrast = [_column_contrast(v) for v in views["local"]]
    assert min(contrast) > 100, contrast  # 255 for a 1:1 cut; about 0 from a downsampled copy


def test_views_never_upsampled_when_the_source_has_the_pixels(tmp_path):
    """Every box, main view included, holds at least its view's size in decoded pixels; large JPEGs are decoded at a
    reduced scale when every box allows it; a small image is upsampled only because it has no more pixels."""
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (1536, 2048, 3), dtype=np.uint8)).save(big, quality=90)
    cropper = ViewCropper(_views(global_size=64, global_crops=4, local_crops=6, local_size=24))
    torch.manual_seed(0)
    decoded_widths = []
    for _ in range(40):
        img, boxes = cropper.decode(str(big))
        decoded_widths.append(img.width)
        for b in boxes:
            assert min(b.width * img.width, b.height * img.height) >= b.size - 0.5, (img.size, b)
    assert min(decoded_widths) < 2048  # the draft reduction was used
    out = cropper(str(big))
    assert out["main"].shape == (3, 64, 64) and out["global"].shape == (3, 3, 64, 64) and out["local"].shape == (6, 3, 24, 24)

    small = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(small)
    img, boxes = cropper.decode(str(small))
    assert img.size == (50, 40)  # decoded whole: there is nothing more to keep


def test_exif_rotated_jpeg_boxes_follow_the_shown_orientation(tmp_path):
    """A portrait photo stored landscape with EXIF orientation 6 is cropped in its shown (portrait) frame."""
    path = tmp_path / "rotated.jpg"
    img = Image.fromarray(np.zeros((300, 600, 3), dtype=np.uint8))  # stored 600 wide, 300 high
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif)
    cropper = ViewCropper(_views(global_size=64, local_size=32))
    decoded, boxes = cropper.decode(str(path))
    w, h = decoded.size
    assert h == 2 * w  # portrait, maybe at a draft reduction
    for b in boxes:
        assert min(b.width * w, b.height * h) >= b.size - 0.5


def test_wds_training_loader_yields_views(tmp_path):
    from stellar_tok.data.shard_writer import make_shards

    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "src" / c)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "src" / c / f"{i}.jpg")
    make_shards(str(tmp_path / "src"), str(tmp_path / "wds"), shard_size=4, prefix="train")
    data = OmegaConf.create({"name": "wds", "path": str(tmp_path / "wds"), "resolution": 288, "seed": 0, "epoch_size": 6})
    vcfg = _views(global_size=64, global_crops=2, local_crops=2, local_size=32)
    images, labels = next(iter(build_loader(data, 3, "train", views=vcfg)))
    assert images["main"].shape == (3, 3, 64, 64) and images["local"].shape == (3, 2, 3, 32, 32)
    assert images["main"].dtype == torch.uint8 and set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("name", ["shapes"])
def test_in_memory_data_keeps_the_batch_path(name):
    """In-memory sets are their own originals: the loader yields the images, make_views cuts them on the device."""
    data = OmegaConf.create({"name": name, "resolution": 32, "train_size": 8, "val_size": 8, "seed": 0})
    images, _ = next(iter(build_loader(data, 4, "train", views=_views())))
    assert isinstance(images, torch.Tensor) and images.shape == (4, 3, 32, 32)
