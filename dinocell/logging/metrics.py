"""The metrics logger of a training run: one record per `train.log_every` iterations, sent to every sink.

Sinks (dinocell.logging.sinks): `output_dir/training_metrics.json` (JSON lines), a console / log-file line with
losses, speed and ETA, and wandb (`logging.wandb: true`; honours WANDB_MODE=offline), imported only when enabled.
Only rank 0 writes; other ranks build a disabled logger (no sinks) so the trainer needs no rank checks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.logging.sinks import ConsoleSink, JsonLinesSink, MetricsSink, WandbSink

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


class MetricsLogger:
    """Writes one metrics record (and pictures) to every sink."""

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
        self.sinks: list[MetricsSink] = []
        if not enabled:
            return
        self.sinks = [JsonLinesSink(output_dir, start_iteration=start_iteration),
                      ConsoleSink(total_iterations=total_iterations)]
        if wandb_cfg is not None and wandb_cfg.wandb:
            self.sinks.append(
                WandbSink(output_dir, project=wandb_cfg.wandb_project, run_name=wandb_cfg.wandb_run_name,
                          start_iteration=start_iteration, config=config)
            )

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_metrics(record)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for sink in self.sinks:
            sink.log_images(images, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
