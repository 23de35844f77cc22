"""benchmarks/real_images: a variant's overrides reach both training runs and name its folder, section and
pictures; a run left out is reported as not run, never as a pass or a fail."""
import dataclasses

import pytest

from benchmarks import real_images
from stellar_tok.errors import UserError


def test_a_variant_changes_both_runs_and_is_named_everywhere():
    args = real_images.read_args(["minutes=7", "tag=dec_192x4", "set=model.decoder_width=192 model.decoder_depth=4"])
    assert args.name == "cpu_7min_dec_192x4" and args.out.endswith("cpu_7min_dec_192x4")
    for variant in ("stellar", "recon_only"):
        cmd = real_images.train_cmd(variant, args, "/x")
        assert "model.decoder_width=192" in cmd and "model.decoder_depth=4" in cmd
        assert ("align.enabled=false" in cmd) == (variant == "recon_only")
    line = real_images.command_line(args)
    assert "tag=dec_192x4" in line and "'set=model.decoder_width=192 model.decoder_depth=4'" in line
    assert real_images.pixel_values(args) == 3 * 64 * 64
    at_32 = "model.image_size=32 views.global_size=32 views.local_size=16 data.resolution=32"  # what training accepts at 32 px
    assert real_images.pixel_values(dataclasses.replace(args, set=at_32)) == 3 * 32 * 32
    plain = real_images.read_args([])
    assert plain.name == "cpu_20min" and real_images.train_cmd("stellar", plain, "/x")[-6] == "train.steps=100000"


@pytest.mark.parametrize("argv, message", [(["set=model.depth=2"], "tag="), (["runs=recon_only"], "runs="),
                                           (["tag=a b"], "tag="), (["tag=x", "set=model.bogus=1"], "set=")])
def test_unnamed_variants_and_runs_without_stellar_are_refused(argv, message, capsys):
    with pytest.raises(UserError) as e:
        real_images.read_args(argv)
    assert message in str(e.value)


def _run(psnr, rfid, linear):
    return {"report": {"results": {"stellar": {"psnr": psnr, "rfid": rfid, "linear_tokens": linear},
                                   "pixels_down": {"rfid": 90.0}, "pixels": {"linear_pixels": 60.0}}}}


def test_the_verdict_marks_parts_without_their_run_as_not_run():
    both = real_images.verdict({"stellar": _run(15.0, 80.0, 61.0), "recon_only": _run(16.5, 70.0, 40.0)})
    assert [ok for _, ok, _ in both] == [True, False, True, True]  # 15.0 is 1.5 dB under 16.5
    alone = real_images.verdict({"stellar": _run(15.0, 100.0, 61.0)})
    assert [ok for _, ok, _ in alone] == [False, None, True, None]
    assert [what for what, _, _ in alone] == [what for what, _, _ in both]
