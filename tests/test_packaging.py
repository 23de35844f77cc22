"""What an installed package gives a user outside the checkout: the configs by name, the wheel's contents, and the
module paths of the previous release."""
import importlib
import pathlib
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest
import yaml

from generators.config import GenConfig
from stellar_tok.config import CONFIG_DIR, load_config, packaged_configs
from stellar_tok.errors import UserError
from stellar_tok.moved_modules import MOVED

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_configs_load_by_name_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    tiny = yaml.safe_load(open(ROOT / "configs" / "tokenizer" / "tiny.yaml"))
    for name in ("tiny", "tiny.yaml", "tokenizer/tiny", "configs/tokenizer/tiny.yaml"):
        cfg = load_config([f"config={name}"])
        assert cfg.model.width == tiny["model"]["width"] and cfg.model.depth == tiny["model"]["depth"], name
    gen = yaml.safe_load(open(ROOT / "configs" / "generator" / "tiny.yaml"))
    cfg = load_config(["config=tiny"], schema=GenConfig, kind="generator")
    assert cfg.model.width == gen["model"]["width"]


def test_a_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("model:\n  depth: 1\n")  # a file named like a packaged config
    assert load_config(["config=tiny"]).model.depth == 1


def test_an_unknown_config_name_lists_the_packaged_ones():
    with pytest.raises(UserError) as e:
        load_config(["config=nosuch"])
    assert "nosuch" in str(e.value) and "tiny" in str(e.value) and "vit_b16" in str(e.value)
    assert "\n" not in str(e.value)
    assert set(packaged_configs("generator")) >= {"tiny", "b", "l", "xl"}


def test_the_checkout_configs_folder_is_the_packaged_one():
    assert (ROOT / "configs").resolve() == pathlib.Path(CONFIG_DIR).resolve()


def test_the_wheel_ships_every_package_and_the_configs(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for top in ("stellar_tok", "generators"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("stellar_tok-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in (pathlib.Path(CONFIG_DIR)).rglob("*.yaml"):
        assert f"stellar_tok/configs/{cfg.relative_to(CONFIG_DIR).as_posix()}" in names
    packages = {p.parent.relative_to(ROOT).as_posix() for top in ("stellar_tok", "generators")
                for p in (ROOT / top).rglob("__init__.py")}
    assert packages <= {n.rpartition("/")[0] for n in names}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_with_a_future_warning(old):
    sys.modules.pop(f"stellar_tok.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"stellar_tok.{old}")
    assert module is importlib.import_module(f"stellar_tok.{MOVED[old]}")
    assert any(issubclass(w.category, FutureWarning) and f"stellar_tok.{MOVED[old]}" in str(w.message) for w in caught)
