"""Metric sinks: resumed runs keep one JSON line per iteration and continue the same wandb run."""

import json

import pytest

from dinocell.config.schema import LoggingConfig
from dinocell.logging import MetricsLogger
from dinocell.logging.sinks import WandbSink


def _record(iteration: int) -> dict:
    losses = dict.fromkeys(
        ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"), 1.0
    )
    timing = {"iter_time": 0.1, "data_time": 0.0, "images_per_s": 10.0}
    return {"iteration": iteration, "epoch": iteration / 2, "lr": 1e-3, **timing, **losses}


@pytest.mark.slow
def test_resume_rewrites_later_lines_and_continues_the_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging_cfg = LoggingConfig(wandb=True, wandb_project="test")

    def run(start: int, stop: int) -> str:
        metrics = MetricsLogger(tmp_path, total_iterations=6, start_iteration=start, enabled=True,
                                logging_cfg=logging_cfg)
        for it in range(start, stop):
            metrics.log(_record(it))
        run_id = next(s for s in metrics.sinks if isinstance(s, WandbSink)).run.id
        metrics.close()
        return run_id

    first = run(0, 5)  # crashed after iteration 4; the checkpoint holds iteration 3
    resumed = run(3, 6)
    lines = [json.loads(line)["iteration"] for line in (tmp_path / "training_metrics.json").read_text().splitlines()]
    assert lines == [0, 1, 2, 3, 4, 5]
    assert resumed == first
    assert run(0, 1) != first  # a fresh start (e.g. --no-resume) is a new wandb run
