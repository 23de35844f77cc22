"""The demo's closing lines: the class-accuracy figure and where to look, from the files the demo wrote."""
import json
import os

import pytest

from stellar_tok.demo_report import main, report


def write_demo_files(run):
    os.makedirs(os.path.join(run, "samples"))
    os.makedirs(os.path.join(run, "eval"))
    acc = {"judge_val_accuracy": 96.63, "accuracy": 71.4, "per_class": {str(k): 70.0 for k in range(10)}, "n": 500}
    with open(os.path.join(run, "samples", "class_accuracy.json"), "w") as f:
        json.dump(acc, f)
    with open(os.path.join(run, "eval", "metrics.md"), "w") as f:
        f.write("| model | PSNR |\n|---|---:|\n| tokenizer | 21.30 |\n")


def test_report_states_the_accuracy_the_chance_and_the_pictures(tmp_path):
    run = str(tmp_path / "demo")
    write_demo_files(run)
    text = report(run)
    assert "71.4% of 500" in text
    assert "chance 10%" in text
    assert "96.6% on real held-out digits" in text
    assert os.path.join(run, "samples", "grid.png") in text
    assert os.path.join(run, "pictures", "token_swap.png") in text
    assert "| tokenizer | 21.30 |" in text  # the evaluation table is printed whole


def test_missing_demo_output_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([f"run={tmp_path / 'nothing'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class_accuracy.json not found" in err


def test_unknown_key_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["runn=x"])
    assert "runn" in capsys.readouterr().err
