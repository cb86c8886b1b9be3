"""Console progress: tqdm on a terminal, whole periodic lines elsewhere; the training ETA uses the mean speed."""

from __future__ import annotations

import io
import logging
import types

import pytest
from test_metrics import _record
from tqdm import tqdm

import dinocell.logging.metrics as metrics_module
import dinocell.logging.progress as progress_module
from dinocell.logging import MetricsLogger
from dinocell.logging.progress import progress


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr(metrics_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_whole_lines_every_period(clock):
    stream = io.StringIO()
    seen = []
    for item in progress(range(10), desc="features", unit="batch", stream=stream, every_s=30, leave=False):
        seen.append(item)
        clock.now += 7.0  # 7 s per batch: lines after batches 5 (35 s) and 10 (70 s)
    assert seen == list(range(10))
    assert stream.getvalue().splitlines() == [
        "features: 5/10 batch (50%), 0.143 batch/s, eta 0:00:35",
        "features: 10/10 batch (100%), 0.143 batch/s, eta 0:00:00",
        "features: 10 batch in 0:01:10",
    ]
    assert "\r" not in stream.getvalue()


def test_a_short_loop_is_quiet_unless_asked_to_leave_a_line(clock):
    quiet, kept = io.StringIO(), io.StringIO()
    list(progress(range(3), desc="features", unit="batch", stream=quiet, leave=False))
    with progress(total=40, desc="mean-std", unit="img", stream=kept) as bar:
        for _ in range(4):
            clock.now += 0.5
            bar.update(10)
    assert quiet.getvalue() == ""
    assert kept.getvalue() == "mean-std: 40 img in 0:00:02\n"


def test_an_iterable_without_length_counts_without_a_total(clock):
    stream = io.StringIO()
    for _ in progress((i for i in range(4)), desc="fields", unit="field", stream=stream, every_s=30):
        clock.now += 10.0
    assert stream.getvalue().splitlines() == ["fields: 3 field, 0.1 field/s", "fields: 4 field in 0:00:40"]


def test_on_a_terminal_progress_is_a_tqdm_bar():
    stream = Terminal()
    bar = progress(range(3), desc="features", unit="batch", stream=stream)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2] and "features: 100%" in stream.getvalue()


def test_eta_uses_the_mean_speed_since_the_first_log_not_the_last_window(tmp_path, clock, monkeypatch):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dinocell")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "level", logging.INFO)
    metrics = MetricsLogger(tmp_path, total_iterations=100, start_iteration=0, enabled=True)
    clock.now += 500.0  # the first window: start-up work makes it slow
    metrics.log({**_record(9), "iter_time": 50.0})
    for it, window_s in ((19, 10.0), (29, 10.0), (39, 40.0)):  # one slow window (a checkpoint, an eval)
        clock.now += window_s
        metrics.log(_record(it))
    etas = [line.rsplit("eta ", 1)[1] for line in lines]
    # after it 19: 10 s per 10 it -> 80 it left = 80 s; after it 29: 20 s / 20 it -> 70 s; after it 39: 60 s / 30 it
    # -> 60 it x 2 s = 120 s (the last window alone would say 240 s, the first one 500 s)
    assert etas == ["-", "0:01:20", "0:01:10", "0:02:00"]
