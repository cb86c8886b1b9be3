"""Metric sinks of a training run.

- `output_dir/training_metrics.json`: one JSON object per line, every `train.log_every` iterations (and the last);
- a console / log-file line with losses, speed and ETA;
- wandb (`logging.wandb: true`; honours WANDB_MODE=offline), imported only when enabled.
Only rank 0 writes; other ranks build a disabled logger so the trainer needs no rank checks.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("dinocell")


def setup_logging(output_dir: Path, *, enabled: bool) -> logging.Logger:
    """Log to stdout and to output_dir/logs/log.txt (rank 0); other ranks only print warnings."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if enabled:
        (Path(output_dir) / "logs").mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / "logs" / "log.txt")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def _wandb_run_id(output_dir: Path, *, new: bool) -> str:
    """The wandb run id of this output directory, so that a resumed run continues the same wandb run; a run that
    starts at iteration 0 (first start or --no-resume) gets a fresh id."""
    path = output_dir / "logs" / "wandb_run_id.txt"
    if not new and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


VALIDATION_FIELDS = ("val_loss", "knn_top1")


def _terms(record: dict[str, Any]) -> str:
    """The loss terms of a record ("dino_global_crops 4.9287  ibot 2.2294 ..."): its *_loss fields but the total."""
    return "  ".join(f"{key[: -len('_loss')]} {value:.4f}" for key, value in record.items()
                     if key.endswith("_loss") and key not in ("total_loss", *VALIDATION_FIELDS))


def _validation(record: dict[str, Any]) -> str:
    return "".join(f"  {key} {record[key]:.4f}" for key in VALIDATION_FIELDS if key in record)


class MetricsLogger:
    """Writes one metrics record to every enabled sink."""

    def __init__(
        self,
        output_dir: Path,
        *,
        total_iterations: int,
        start_iteration: int,
        enabled: bool,
        wandb_cfg: Any = None,
        config: Any = None,
    ) -> None:
        self.enabled = enabled
        self.total_iterations = total_iterations
        self.path = Path(output_dir) / "training_metrics.json"
        if enabled and self.path.exists():
            # a resumed run repeats the iterations after its checkpoint: keep one line per iteration
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["iteration"] < start_iteration]
            tmp = self.path.with_suffix(".json.tmp")  # replaced atomically: a crash here keeps the old lines
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self._wandb = None
        if enabled and wandb_cfg is not None and wandb_cfg.wandb:
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.wandb_project,
                name=wandb_cfg.wandb_run_name or Path(output_dir).resolve().name,
                dir=str(output_dir),
                config=config,
                id=_wandb_run_id(Path(output_dir), new=start_iteration == 0),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        remaining = (self.total_iterations - record["iteration"] - 1) * record["iter_time"]
        eta = datetime.timedelta(seconds=int(remaining))
        logger.info(
            "it %d/%d  ep %.2f  loss %.4f (%s)  lr %.2e  %.3fs/it (data %.3fs)  %.1f img/s  eta %s%s",
            record["iteration"], self.total_iterations, record["epoch"], record["total_loss"], _terms(record),
            record["lr"], record["iter_time"], record["data_time"], record["images_per_s"], eta, _validation(record),
        )
        if self._wandb is not None:
            self._wandb.log(record, step=record["iteration"])

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
