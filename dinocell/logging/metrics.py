"""The metrics logger of a training run: one record per `train.log_every` iterations, the evaluation records and
pictures, sent to every sink.

Sinks (dinocell.logging.sinks): `output_dir/training_metrics.json` and `output_dir/eval/metrics.json` (JSON lines), a
console / log-file line with losses, speed and ETA, and, as the `logging` section of the config says, wandb (honours
WANDB_MODE=offline), TensorBoard and trackio, each imported only when enabled. Only rank 0 writes; other ranks
build a disabled logger (no sinks) so the trainer needs no rank checks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.logging.sinks import ConsoleSink, JsonLinesSink, MetricsSink, TensorBoardSink, TrackioSink, WandbSink

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
        logging_cfg: Any = None,
        config: Any = None,
    ) -> None:
        """`logging_cfg`: the config's `logging` section (dinocell.config.schema.LoggingConfig), None = no trackers."""
        self.sinks: list[MetricsSink] = []
        if not enabled:
            return
        self.sinks = [JsonLinesSink(output_dir, start_iteration=start_iteration),
                      ConsoleSink(total_iterations=total_iterations)]
        if logging_cfg is None:
            return
        run_name = logging_cfg.wandb_run_name or Path(output_dir).resolve().name
        trackers = {
            "wandb": lambda: WandbSink(output_dir, project=logging_cfg.wandb_project, run_name=run_name,
                                       start_iteration=start_iteration, config=config),
            "tensorboard": lambda: TensorBoardSink(output_dir, start_iteration=start_iteration),
            "trackio": lambda: TrackioSink(project=logging_cfg.trackio_project, run_name=run_name,
                                           start_iteration=start_iteration, config=config),
        }
        for key, make_sink in trackers.items():
            if getattr(logging_cfg, key):
                try:
                    self.sinks.append(make_sink())
                except ImportError as error:
                    extra = "wandb" if key == "wandb" else "tracking"
                    raise ImportError(f"logging.{key}: true needs the {key} package ({error}): pip install "
                                      f"'dinocell[{extra}]', or set logging.{key}=false") from error

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_metrics(record)

    def log_eval(self, record: dict[str, Any]) -> None:
        """An evaluation record: "iteration" (iterations done) and "eval/..." numbers."""
        for sink in self.sinks:
            sink.log_eval(record)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for sink in self.sinks:
            sink.log_images(images, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
