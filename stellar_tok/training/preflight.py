"""Before a tokenizer run starts: the files it reads exist and fit (a separate step from loading the config, which
also builds models and reads no data).

    cfg = load_config(overrides)    # stellar_tok.config: keys, types, values
    check_data_paths(cfg)           # here: data.path, and the ViT-MAE folder of model.init_from
"""
from __future__ import annotations

import os

from stellar_tok.config import require
from stellar_tok.data import DataError, wds_shards
from stellar_tok.errors import UserError
from stellar_tok.model.mae_init import GET_IT, check_mae_fits, mae_folder_problem


def check_data_paths(cfg) -> None:
    """The files a training run reads exist and fit: its data, and the ViT-MAE folder of model.init_from (a separate
    step: configs are also loaded to build models)."""
    m, d = cfg.model, cfg.data
    if m.init_from is not None:
        require(mae_folder_problem(os.path.expanduser(m.init_from)) is None, "model.init_from", f"a Hugging Face ViT-MAE folder with config.json and model.safetensors (get one: {GET_IT}; null: random init)", m.init_from)
        check_mae_fits(os.path.expanduser(m.init_from), m)  # its config.json only: a mismatch stops the run before any work
    require(d.name != "folder" or os.path.isdir(os.path.expanduser(str(d.path))), "data.path", "an existing folder of images", d.path)
    if d.name == "wds":
        try:
            wds_shards(d, "train")
        except DataError as e:
            raise UserError(f"config key 'data.path': {e}") from None
