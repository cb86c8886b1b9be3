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
