"""Configuration: typed defaults (dataclasses) + a YAML file + `key=value` overrides, via OmegaConf. The tokenizer's
schema and checks are in `stellar_tok.tokenizer_config` (re-exported here); the generator's in `generators.config`.

    python -m stellar_tok.train config=configs/tokenizer/tiny.yaml train.steps=500 model.num_tokens=8

Unknown keys, wrong types and impossible values stop the run before any work, with one line naming the key.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError, require
from .tokenizer_config import (DECODER_KEYS, AlignConfig, AlignWeights, Config, DataConfig, ModelConfig, OptimConfig,
                               ReconConfig, TrainConfig, ViewsConfig, check_precision, cls_is_trained, inert_settings,
                               tokenizer_kwargs, use_decoder_source, validate)

__all__ = ["CONFIG_DIR", "DECODER_KEYS", "AlignConfig", "AlignWeights", "Config", "DataConfig", "ModelConfig", "OptimConfig",
           "ReconConfig", "TrainConfig", "ViewsConfig", "check_precision", "cls_is_trained", "config_file", "inert_settings",
           "load_config", "load_tokenizer_command_config", "packaged_configs", "parse_command", "parse_overrides", "require",
           "require_tokenizer_dir", "tokenizer_kwargs", "use_decoder_source", "validate"]


def _friendly(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"config key '{key}': {msg}" if key else msg


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # shipped in the package (and wheel)


def packaged_configs(kind: str) -> list[str]:
    """The names of the packaged configs of `kind` (tokenizer | generator), e.g. ['tiny', 'vit_b16', ...]."""
    folder = os.path.join(CONFIG_DIR, kind)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []


def config_file(name: str, kind: str = "tokenizer") -> str:
    """The YAML file of `config=NAME`: a path that exists, as given; else a config shipped with the package: a name
    (`tiny` -> configs/<kind>/tiny.yaml), `<kind>/tiny`, or a checkout path (`configs/tokenizer/tiny.yaml`), so the
    documented commands work after `pip install` outside the checkout."""
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return path
    rel = name[len("configs/"):] if name.startswith("configs/") else name
    rel = rel if rel.endswith((".yaml", ".yml")) else rel + ".yaml"
    for candidate in (os.path.join(CONFIG_DIR, kind, rel), os.path.join(CONFIG_DIR, rel)):
        if os.path.isfile(candidate):
            return candidate
    names = ", ".join(packaged_configs(kind)) or "none"
    raise UserError(f"config file {name} does not exist (a path, or a packaged {kind} config: {names})")


def load_config(args: list[str], schema=Config, kind: str = "tokenizer"):
    """`args`: optional `config=PATH|NAME` plus `key=value` overrides (later wins). Returns a DictConfig. `schema`: a
    dataclass (typed keys), or a nested dict of defaults (untyped); either way a key it lacks is refused. `kind`: where
    a config name is looked up among the packaged configs (`config_file`). A schema with a key of its own named
    `config` (a benchmark's `config=NAME`) reads `config=` as that key, not as a file to merge."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)  # dataclasses already are; a dict schema too
    is_file = (lambda a: False) if "config" in cfg else (lambda a: a.startswith("config="))
    files = [config_file(a.split("=", 1)[1], kind) for a in args if is_file(a)]
    overrides = [a for a in args if not is_file(a)]
    for a in overrides:
        if "=" not in a:
            raise UserError(f"argument {a!r} is not of the form key=value (see --help)")
    try:
        for f in files:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(f))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise UserError(_friendly(e)) from None
    validate(cfg) if schema is Config else None
    return cfg


def require_tokenizer_dir(path: str | None) -> str:
    """The config.json of the exported tokenizer folder `path` (`tokenizer=DIR` of a command); a UserError if it is not one."""
    config_json = os.path.join(path or "", "config.json")
    if not path or not os.path.isfile(config_json):
        raise UserError(f"tokenizer=DIR must name an exported tokenizer folder with config.json (got {path!r})")
    return config_json


def load_tokenizer_command_config(overrides: list[str], schema):
    """`load_config` for a command that reads an exported tokenizer (`tokenizer=DIR`): the folder must hold a
    config.json, and `data.resolution` defaults to the tokenizer's image_size unless given."""
    cfg = load_config(overrides, schema=schema)
    config_json = require_tokenizer_dir(cfg.tokenizer)
    if not any(a.startswith("data.resolution=") for a in overrides):
        with open(config_json) as f:
            cfg.data.resolution = int(json.load(f)["image_size"])
    return cfg


def parse_overrides(prog: str | None, doc: str, schema, argv: list[str] | None, example: str) -> list[str]:
    """The command line of every command (with `load_config`, or both at once with `parse_command`): `--help`
    prints `doc` and every key of `schema` with its default. Returns the overrides (unparsed strings); `argv` None
    reads sys.argv."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every key and its default:\n\n" + OmegaConf.to_yaml(OmegaConf.structured(schema)))
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    return p.parse_args(sys.argv[1:] if argv is None else argv).overrides


def parse_command(prog: str | None, doc: str, schema, argv: list[str] | None, example: str):
    """`parse_overrides` then `load_config`: a command's `key=value` arguments as a DictConfig of `schema`; an
    unknown key, a wrong type or a bad file stops with a UserError naming it (one line under `cli_entry`)."""
    return load_config(parse_overrides(prog, doc, schema, argv, example), schema=schema)
