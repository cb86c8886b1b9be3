"""Checks a run makes before it builds its model or writes a file, so that a mistake is one message at start-up
rather than a traceback after the k-NN baseline, or a double traceback from a DataLoader worker at the first batch.

- The output directory can be created (it is not under a regular file) and written.
- Every dataset string builds: local roots exist and hold data, an S3 prefix is listed (one cheap request, with the
  retries and the message of dinocell.data.io.s3). Its first sample then goes through the transform that will use
  it: the training crops for train.dataset_path, the evaluation view for the k-NN sets. That checks the channel count
  against student.in_chans under the channel views, channel indices (a wrong index makes every file bad),
  crops.channel_mean/std lengths, masks for masked crops and RGB colour augmentation.
- student.pretrained_weights loads into the backbone with the adaptations training makes. The backbone is built on
  the meta device (no memory, no initialisation; ResNets, which lack that option, are small and built on the CPU).

`preflight` returns the training dataset, so the run uses the object that was checked instead of listing it again.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dinocell.config import ConfigError, SSLConfig, StudentConfig
from dinocell.data import make_dataset
from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.errors import is_user_error, user_message
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.loaders import build_eval_transform, build_ssl_transform


def preflight(cfg: SSLConfig) -> SampleDataset:
    """Raise a user error (one line) for the first problem found; return the training dataset."""
    check_output_dir(Path(cfg.train.output_dir))
    dataset = checked_dataset("train.dataset_path", cfg.train.dataset_path, build_ssl_transform(cfg))
    ev = cfg.evaluation
    if ev.knn_train_dataset and ev.knn_test_dataset:
        view = build_eval_transform(cfg)
        for key in ("knn_train_dataset", "knn_test_dataset"):
            checked_dataset(f"evaluation.{key}", getattr(ev, key), lambda sample, _: view(sample))
    if cfg.student.pretrained_weights:
        check_pretrained(cfg.student)
    return dataset


def check_output_dir(out: Path) -> None:
    """Raise ConfigError when `out` cannot be created or written; writes nothing."""
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir={str(out)!r}: {existing} is a file, not a folder; choose another "
                          "--output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir={str(out)!r}: {existing} is not writable by this user; choose another "
                          "--output-dir or fix the permissions")


def checked_dataset(key: str, dataset_str: str, transform: Callable[[Any, int], Any]) -> SampleDataset:
    """The dataset `dataset_str` names, after its first sample went through `transform(sample, position)`."""
    try:
        dataset = make_dataset(dataset_str)
        if len(dataset) == 0:
            raise DatasetError("it holds no samples")
        with _held(logging.getLogger("dinocell.data")) as warnings_held:
            sample = dataset[0]  # bad first files are skipped; a wrong channel index or location fails every file
        for record in warnings_held:  # a sample loaded: the bad files before it are worth their warnings
            logging.getLogger(record.name).handle(record)
        transform(sample, 0)
    except Exception as error:
        if not is_user_error(error):
            raise
        raise DatasetError(f"{key}={dataset_str!r}: {user_message(error)}") from error
    return dataset


@contextmanager
def _held(log: logging.Logger) -> Iterator[list[logging.LogRecord]]:
    """Hold what `log` emits in the block: when no sample loads, the one error says why, instead of a warning per
    file before it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    propagate, log.propagate = log.propagate, False
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def check_pretrained(student: StudentConfig) -> None:
    """Load student.pretrained_weights into a backbone of the configured shape (WeightsError when it does not fit)."""
    kwargs = student.backbone_kwargs()
    backbone = build_backbone(student.arch, **kwargs, **({"device": "meta"} if student.is_vit else {}))
    with warnings.catch_warnings():  # copying into meta tensors is a no-op, which is all a check needs
        warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
        load_pretrained(backbone, student.pretrained_weights, strict=True)
