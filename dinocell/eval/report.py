"""Results of an evaluation on disk: `<task>.json` for programs, `<task>.txt` (a plain-text table) for people."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_value(value: Any) -> str:
    """Floats with 4 significant digits, None as "-", booleans in lower case, the rest as text."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numeric columns right-aligned, text left-aligned."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def percent(fraction: float | None) -> str:
    """A fraction in [0, 1] as a percentage with 2 decimals for tables ("-" when not reported)."""
    return "-" if fraction is None else f"{100.0 * fraction:.2f}"


def write_results(output_dir: str | Path, task: str, results: dict[str, Any], table: str) -> tuple[Path, Path]:
    """Write `<task>.json` and `<task>.txt` atomically (a crash never leaves a half-written result)."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / f"{task}.json", directory / f"{task}.txt"
    for path, text in zip(paths, (json.dumps(results, indent=2, default=str) + "\n", table.rstrip() + "\n")):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
