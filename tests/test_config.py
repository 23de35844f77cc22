"""YAML + key=value overrides; bad configs fail early with one line naming the key."""
import subprocess
import sys

import pytest

from stellar_tok.config import load_config
from stellar_tok.errors import UserError

TINY = "config=configs/tokenizer/tiny.yaml"


def test_yaml_and_overrides():
    cfg = load_config([TINY, "model.num_tokens=8", "optim.lr=0.01", "views.global_scale=[0.5,1.0]", "train.resume=auto"])
    assert cfg.model.num_tokens == 8 and cfg.optim.lr == 0.01
    assert list(cfg.views.global_scale) == [0.5, 1.0]
    assert cfg.model.patch_size == 4  # from the YAML
    assert cfg.align.ot_eps == 0.1  # from the defaults
    assert cfg.train.resume == "auto"


@pytest.mark.parametrize("override,key", [
    ("model.num_tokenz=3", "num_tokenz"),
    ("model.num_tokens=0", "model.num_tokens"),
    ("model.num_tokens=abc", "model.num_tokens"),
    ("model.image_size=30", "model.image_size"),
    ("views.mask_ratio=1.0", "views.mask_ratio"),
    ("data.name=imagenet", "data.name"),
    ("data.name=folder", "data.path"),
    ("align.match=greedy", "align.match"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("views.blur_p=1.5", "views.blur_p"),
    ("train.resume=/does/not/exist", "train.resume"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_config([TINY, override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_not_key_value():
    with pytest.raises(UserError, match="key=value"):
        load_config([TINY, "steps"])


def test_cli_help_and_one_line_error():
    out = subprocess.run([sys.executable, "-m", "stellar_tok.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "accelerate launch" in out.stdout and "num_tokens" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "stellar_tok.train", TINY, "model.num_tokens=0"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "model.num_tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_mixed_precision_no_survives_yaml(tmp_path):
    """YAML reads a bare `no` as false; `train.mixed_precision=no` must still mean no autocast (both trainers)."""
    assert load_config([TINY, "train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config([TINY, "train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    from generators.config import load_config as load_generator_config

    assert load_generator_config([f"data.latents={tmp_path}", "train.mixed_precision=no"]).train.mixed_precision == "no"


def test_gan_start_is_a_fraction_or_a_step_the_run_reaches():
    """The ImageNet configs hold the GAN's start as a fraction of the run (step 100,000 of 187,671 at a global batch
    of 1,024); a step count at or past train.steps is refused before any work, unless the GAN is off."""
    for name in ("vit_b16", "vit_l16", "vit_h14"):
        assert load_config([f"config={name}"]).recon.gan_start == 0.533
    b16 = ["config=vit_b16", "train.epochs=0", "train.steps=300"]
    assert load_config([*b16, "recon.gan_start=150"]).recon.gan_start == 150  # the rehearsal's
    with pytest.raises(UserError, match=r"^config key 'recon.gan_start' must be a fraction of the run in \[0, 1\) or a whole step it reaches \(< train.steps=300;"):
        load_config([*b16, "recon.gan_start=300"])
    with pytest.raises(UserError, match="recon.gan_start"):
        load_config([*b16, "recon.gan_start=1.5"])
    load_config([*b16, "recon.gan_start=300", "recon.gan_weight=0"])  # the GAN off: the key is inert, not wrong


def test_a_key_without_effect_is_named_in_one_warning_line(capsys):
    """tiny.yaml sets align.cls_prototypes, which align.image_loss=contrastive never reads, and trains no CLS."""
    from stellar_tok.config import inert_settings

    lines = inert_settings(load_config(["config=configs/tokenizer/tiny.yaml"]))
    assert any(l.startswith("config key 'align.cls_prototypes' has no effect") for l in lines), lines
    assert any("CLS features of this run are untrained" in l for l in lines)
    assert inert_settings(load_config(["config=configs/tokenizer/vit_b16.yaml"])) == []
    off = inert_settings(load_config(["config=configs/tokenizer/vit_b16.yaml", "recon.gan_weight=0"]))
    assert off == ["config key 'recon.gan_start' has no effect: the GAN is off (recon.gan_weight=0)"]
