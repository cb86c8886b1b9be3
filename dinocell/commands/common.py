"""What several commands share: loading a config and checking the names in it that other layers own."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from dinocell.config import ConfigError, SSLConfig, load_config
from dinocell.data.io.remote import read_text
from dinocell.data.registry import DatasetStringError, parse_dataset_string
from dinocell.models import check_arch


def load_checked_config(config_file: str | pathlib.Path | None, overrides: Sequence[str]) -> SSLConfig:
    """`load_config` (config files may be s3:// or http(s):// URLs), then the backbone name and every dataset string
    are checked (parsed, not built), so a typo fails at start-up rather than after the model is set up."""
    cfg = load_config(config_file, overrides, read_text=read_text)
    try:
        check_arch(cfg.student.arch)
    except ValueError as err:
        raise ConfigError(f"student.arch={cfg.student.arch!r}: {err}") from None
    ev = cfg.evaluation
    named = {"train.dataset_path": cfg.train.dataset_path, "evaluation.knn_train_dataset": ev.knn_train_dataset,
             "evaluation.knn_test_dataset": ev.knn_test_dataset, "evaluation.val_dataset": ev.val_dataset,
             "evaluation.channel_consistency_dataset": ev.channel_consistency_dataset,
             "evaluation.viz_dataset": ev.viz_dataset}
    for key, dataset_str in named.items():
        if dataset_str or key == "train.dataset_path":  # the evaluation sets may be "" (none)
            try:
                parse_dataset_string(dataset_str)
            except DatasetStringError as err:
                raise ConfigError(f"{key}={dataset_str!r}: {err}") from None
    return cfg
