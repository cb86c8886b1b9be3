"""Progress: a tqdm bar on a terminal, plain lines (no carriage returns) in a log file or pipe."""

from __future__ import annotations

import io

from dinocell.logging.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(4, "features", "img", every_s=0.0, stream=stream) as bar:
        for _ in range(4):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 5  # one per update and one at the end
    assert lines[1].startswith("features: 2/4 img (50%)") and "eta" in lines[1]
    assert lines[-1].startswith("features: 4/4")


def test_periodic_lines_only_every_period_and_silent_when_disabled():
    stream = io.StringIO()
    with Progress(1000, "x", every_s=3600.0, stream=stream) as bar:
        bar.update(500)
    assert len(stream.getvalue().splitlines()) == 1  # the closing line only: no period has passed
    quiet = io.StringIO()
    with Progress(10, "x", enabled=False, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_a_bar_on_a_terminal():
    stream = Terminal()
    with Progress(3, "epoch 1/2", "batch", stream=stream) as bar:
        bar.update(3)
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


def test_training_eta_uses_the_mean_speed_since_the_first_log_not_the_last_window(tmp_path, monkeypatch):
    import logging
    import types

    from test_metrics import _record

    import dinocell.logging.sinks as sinks_module
    from dinocell.logging import MetricsLogger

    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sinks_module, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dinocell")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "_cache", {})  # isEnabledFor caches its answer per level; setting .level does not
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
