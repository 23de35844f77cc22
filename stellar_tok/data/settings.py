"""The data configuration: one typed `DataConfig` from whatever a caller passes, and the checks of its values.

`as_data_config` turns a `stellar_tok.config.DataConfig`, an OmegaConf DictConfig, a plain dict or any object
with the same attributes into one `DataConfig` instance (keys that DataConfig does not define are ignored,
missing ones take its defaults), once, at each public entry of `stellar_tok.data`; the code after it reads
attributes. The instance is a plain dataclass, not an OmegaConf node, so ``path`` and ``val_path`` may also
hold a list of shards, as they always could. The checks here (`check_name_split`, `positive_int`,
`require_path`, `held_out_path`) raise `DataError`: a `UserError` and `ValueError` whose one line names the
key and the value to fix.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from stellar_tok.config import DataConfig
from stellar_tok.errors import UserError

from .images import MIN_IMAGE_SIDE

DATA_NAMES = ("shapes", "digits", "folder", "wds")
SPLITS = ("train", "val")
DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


class DataError(UserError, ValueError):
    """A data configuration the user can fix (unknown name, missing path, empty folder, ...)."""


def as_data_config(given: Any) -> DataConfig:
    """``given`` (a DataConfig, a DictConfig, a dict or an object with DataConfig's attributes) as a DataConfig;
    a DataConfig comes back as it is. Values are not checked here: each is checked where it is used."""
    if isinstance(given, DataConfig):
        return given
    if OmegaConf.is_config(given):
        given = OmegaConf.to_container(given, resolve=True)
    if isinstance(given, Mapping):
        values = {key: given[key] for key in DATA_KEYS if key in given}
    else:
        values = {key: getattr(given, key) for key in DATA_KEYS if hasattr(given, key)}
    return DataConfig(**values)


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else a `DataError` naming ``key``."""
    try:
        number = int(value)
        ok = number == value and number >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{key} must be an integer >= {minimum} (got {value!r})")
    return number


def check_name_split(data: DataConfig, split: str) -> tuple[str, int]:
    """``(data.name, data.resolution)`` once both and ``split`` are known to be valid."""
    if data.name not in DATA_NAMES:
        raise DataError(f"data.name must be one of {', '.join(DATA_NAMES)} (got {data.name!r})")
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    return data.name, positive_int(data.resolution, "data.resolution", minimum=MIN_IMAGE_SIDE)


def _unset(path: Any) -> bool:
    return path is None or (isinstance(path, str) and not path.strip())


def _expand(path: Any) -> Any:
    if hasattr(path, "__iter__") and not isinstance(path, (str, os.PathLike)):
        return [os.path.expanduser(str(p)) for p in path]  # a list of shards
    return os.path.expanduser(str(path))


def require_path(data: DataConfig, what: str) -> Any:
    """``data.path``, user-expanded (a list of shards: each of them); a `DataError` when it is unset, ``what`` saying
    what it should name."""
    path = data.path
    if _unset(path):
        raise DataError(f"data.path is required for data.name='{data.name}': {what}")
    return _expand(path)


def held_out_path(data: DataConfig, split: str) -> Any:
    """``data.val_path`` (expanded) for the held-out split; None for train or when unset (then ``data.path``'s
    own split logic applies)."""
    path = data.val_path if split == "val" else None
    if _unset(path):
        return None
    return _expand(path)
