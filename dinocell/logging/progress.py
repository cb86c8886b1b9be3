"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines when the stream is a file or a pipe.

tqdm redraws its bar with carriage returns; in a log file or a CI log those become one endless line with warnings
glued onto it. When the stream is not a terminal, a line "desc: done/total unit (pct) rate, eta" is written every
`every_s` seconds and once at the end instead.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`update(n)` after each step; `close()` (or leave the `with` block) at the end. Disabled = silent."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        every_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self._start = self._last = time.monotonic()
        is_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream) if enabled and is_terminal else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._write()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._write()
            self.enabled = False  # a second close writes nothing

    def _write(self) -> None:
        now = time.monotonic()
        self._last = now
        rate = self.done / max(now - self._start, 1e-9)
        text = f"{self.desc}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
            eta = datetime.timedelta(seconds=int((self.total - self.done) / rate)) if rate > 0 else "?"
            text += f" {rate:.1f} {self.unit}/s, eta {eta}"
        else:
            text += f" {self.unit} {rate:.1f} {self.unit}/s"
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
