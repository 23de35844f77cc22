"""benchmarks/gpu_check.sh at SCALE=cpu: the GPU check's stages shrunk to a CPU, so the script cannot rot between the
sessions that have a GPU. Also the rows of benchmarks/train_step.py it is built on."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu_check import read_rows, row_label, rows_table
from benchmarks.train_step import TrainStep, measure_rows, parse_row
from stellar_tok.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_row_specs_parse_and_refuse_unknown_options():
    assert parse_row("base") == {}
    assert parse_row("ckpt=-1+fused+batch=64") == {"ckpt": -1, "fused": True, "batch": 64}
    for bad in ("ckpt", "fused=1", "bigger"):
        with pytest.raises(UserError, match="row option"):
            parse_row(bad)
    with pytest.raises(UserError, match="only the last row"):
        measure_rows("tiny", ["compile", "base"], 2, 0, 1, 1, "cpu", "fp32")


def test_rows_measure_each_setting_in_one_process():
    got = []
    specs = ["base", "ckpt=-1+fused", "batch=3+channels_last", "batch=4+ckpt=-1", "batch=4"]
    rows = measure_rows("tiny", specs, 2, 0, 1, 1, "cpu", "fp32", emit=got.append)
    assert got == rows and [r["row"] for r in rows] == specs
    assert [r["batch"] for r in rows] == [2, 2, 3, 4, 4]
    # FLOPs are counted per batch, and are the model's: the forward that checkpointing recomputes is not counted
    assert rows[0]["step_tflop"] == rows[1]["step_tflop"] < rows[2]["step_tflop"] < rows[3]["step_tflop"] == rows[4]["step_tflop"]
    # the count under activation checkpointing is the model's, without the recomputed forward
    run = TrainStep("tiny", 2, "cpu", "fp32", ("train.activation_checkpointing=-1",))
    with_ckpt = run.count_flops()[0]
    assert run.tok.checkpoint_blocks == len(run.tok.blocks)
    run.tok.set_activation_checkpointing(0)
    assert with_ckpt == run.count_flops()[0]
    table = rows_table(rows)
    assert "| every encoder block checkpointed + fused AdamW | 2 |" in table and "| batch 3 + channels-last LPIPS | 3 |" in table
    assert row_label("ckpt=6+compile") == "6 encoder blocks checkpointed + compiled blocks (cold compile)"


def test_gpu_check_runs_at_cpu_scale(tmp_path):
    env = {**os.environ, "SCALE": "cpu", "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "PY": sys.executable}
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and {"gpu_check.md", "gpu_check.json", "logs.tar.gz", "samples_grid.png"} <= set(files)
    rows = json.loads((out / "gpu_check.json").read_text())
    assert [r["row"] for r in rows["b16"]] == ["base", "ckpt=0", "ckpt=2", "ckpt=-1", "fused", "channels_last"]
    assert all("error" not in r and r["step_s"] > 0 for r in rows["b16"] + rows["h14"])
    report = (out / "gpu_check.md").read_text()
    stages = [json.loads(x) for x in (tmp_path / "work" / "stages.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["rc"]) for s in stages] == [("b16", 0), ("chain", 0), ("h14", 0)]
    # the chain ran every stage but the FSDP one, through to the FID
    assert "| fid |" in report and "h14_start" not in report and "(no row finished)" not in report
    assert [r["row"] for r in read_rows(str(tmp_path / "work" / "logs" / "h14.log"))] == ["batch=2+ckpt=0", "base", "batch=4"]
