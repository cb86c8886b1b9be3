"""Where metrics and pictures of a run go. Each sink takes the same four calls, so the MetricsLogger holds a list:

    log_metrics(record)          one training record: a flat dict with an int "iteration" and numbers
    log_eval(record)             one evaluation record: "iteration" (iterations done) and "eval/..." numbers
    log_images(images, step)     {name: uint8 [H, W, 3] picture}, e.g. attention maps at an eval period
    close()

- JsonLinesSink: output_dir/training_metrics.json and output_dir/eval/metrics.json, one object per line; a resumed run
  first drops the lines from its start iteration on (the iterations it is about to repeat) and any line a crash cut
  off. Pictures are written as files by their producer.
- ConsoleSink: the one-line summary per training record on the "dinocell" logger (stdout and logs/log.txt); the
  evaluation writes its own summary lines.
- WandbSink: Weights & Biases, online or offline (WANDB_MODE); a resumed run continues the same wandb run.
- TensorBoardSink: event files under output_dir/tensorboard (torch.utils.tensorboard); a resumed run purges the
  events from its start iteration on, so the curves show no doubled stretch.
- TrackioSink: trackio's local SQLite store (TRACKIO_DIR, default ~/.cache/huggingface/trackio; no server, no
  network); `trackio show --project NAME` opens its dashboard. A resumed run continues the run of the same name.

The optional packages (wandb, tensorboard, trackio) are imported only by the sink that needs them.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger("dinocell")
METRICS_FILE = "training_metrics.json"
EVAL_METRICS_FILE = "eval/metrics.json"


class MetricsSink(Protocol):
    def log_metrics(self, record: dict[str, Any]) -> None: ...

    def log_eval(self, record: dict[str, Any]) -> None: ...

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None: ...

    def close(self) -> None: ...


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The scalar fields of a record (bools and strings are not curves)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _before(path: Path, line: str, start_iteration: int) -> bool:
    """Keep a line of an iteration before the resume point; a line cut off by a crash is dropped."""
    try:
        return json.loads(line)["iteration"] < start_iteration
    except (json.JSONDecodeError, KeyError, TypeError):
        if line.strip():
            logger.warning("%s: dropping a line that is not a complete record: %.80s", path, line)
        return False


class JsonLinesSink:
    def __init__(self, output_dir: Path, *, start_iteration: int) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.eval_path = Path(output_dir) / EVAL_METRICS_FILE
        for path in (self.path, self.eval_path):
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if _before(path, line, start_iteration)]
                tmp = path.with_suffix(".json.tmp")  # replaced atomically: a crash here keeps the old lines
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_eval(self, record: dict[str, Any]) -> None:
        self.eval_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        pass  # pictures are files of their own (output_dir/eval/<iteration>/), written where they are made

    def close(self) -> None:
        pass


VALIDATION_FIELDS = ("val_loss", "knn_top1")


def _terms(record: dict[str, Any]) -> str:
    """The loss terms of a record ("dino_global_crops 4.9287  ibot 2.2294 ..."): its *_loss fields but the total (DINO
    and SimCLR log different terms)."""
    return "  ".join(f"{key[: -len('_loss')]} {value:.4f}" for key, value in record.items()
                     if key.endswith("_loss") and key not in ("total_loss", *VALIDATION_FIELDS))


def _validation(record: dict[str, Any]) -> str:
    return "".join(f"  {key} {record[key]:.4f}" for key in VALIDATION_FIELDS if key in record)


class ConsoleSink:
    """One log line per record. The ETA comes from the mean speed since the first logged record: the first window
    holds the start-up work, so it gives none ('-'), and one slow window does not swing it."""

    def __init__(self, *, total_iterations: int) -> None:
        self.total_iterations = total_iterations
        self._since: tuple[float, int] | None = None  # (clock, iteration) of the first record

    def _eta(self, iteration: int) -> str:
        now = time.monotonic()
        if self._since is None:
            self._since = (now, iteration)
        start, first = self._since
        if iteration == first:
            return "-"
        remaining = (self.total_iterations - iteration - 1) * (now - start) / (iteration - first)
        return str(datetime.timedelta(seconds=round(remaining)))

    def log_metrics(self, record: dict[str, Any]) -> None:
        logger.info(
            "it %d/%d  ep %.2f  loss %.4f (%s)  lr %.2e  %.3fs/it (data %.3fs)  %.1f img/s  eta %s%s",
            record["iteration"], self.total_iterations, record["epoch"], record["total_loss"], _terms(record),
            record["lr"], record["iter_time"], record["data_time"], record["images_per_s"],
            self._eta(record["iteration"]), _validation(record),
        )

    def log_eval(self, record: dict[str, Any]) -> None:
        pass  # dinocell.train.periodic logs a readable summary of each evaluation itself

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def wandb_run_id(output_dir: Path, *, new: bool) -> str:
    """The wandb run id of this output directory, so that a resumed run continues the same wandb run; a run that
    starts at iteration 0 (first start or --no-resume) gets a fresh id."""
    path = output_dir / "logs" / "wandb_run_id.txt"
    if not new and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    def __init__(
        self, output_dir: Path, *, project: str, run_name: str, start_iteration: int, config: Any = None
    ) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_name or Path(output_dir).resolve().name,
            dir=str(output_dir),
            config=config,
            id=wandb_run_id(Path(output_dir), new=start_iteration == 0),
            resume="allow",
        )

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.run.log(record, step=record["iteration"])

    log_eval = log_metrics

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({name: self._wandb.Image(picture) for name, picture in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def tensorboard_tag(field: str) -> str:
    """TensorBoard groups tags by their prefix: losses under loss/, other training fields under train/; a field
    that already has a prefix ("eval/knn_top1") keeps it."""
    if "/" in field:
        return field
    return f"loss/{field}" if field.endswith("_loss") else f"train/{field}"


class TensorBoardSink:
    def __init__(self, output_dir: Path, *, start_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(output_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_iteration or None)

    def log_metrics(self, record: dict[str, Any]) -> None:
        step = record["iteration"]
        for field, value in _numbers(record).items():
            if field != "iteration":
                self.writer.add_scalar(tensorboard_tag(field), value, step)

    log_eval = log_metrics

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for name, picture in images.items():
            self.writer.add_image(name, picture, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class TrackioSink:
    def __init__(self, *, project: str, run_name: str, start_iteration: int, config: Any = None) -> None:
        import trackio

        self._trackio = trackio
        resume = "allow" if start_iteration > 0 else "never"  # a fresh start (or --no-resume) is a new run
        self.run = trackio.init(project=project, name=run_name, config=config, resume=resume)

    def log_metrics(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in _numbers(record).items() if k != "iteration"}
        self.run.log(values, step=record["iteration"])

    log_eval = log_metrics

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({name: self._trackio.Image(picture) for name, picture in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
