"""Training curves of a run directory, over iterations: `training_metrics.json` (JSON lines) and the evaluations
during training, from `eval/metrics.json` (k-NN top-1 of every k, channel-consistency retrieval), or, for runs
written before it existed, from `eval/knn.json` (k-NN top-1 at the start and the end).

Resumed runs: a restart shows in the file as an iteration lower than or equal to one already read. Everything the
earlier attempt logged from that iteration on is superseded by the lines that follow (so a repeated iteration keeps
its last occurrence, and stale lines of a crashed attempt beyond the resume point are dropped too). A last line cut
off mid-write by a crash is skipped with a warning; a broken line elsewhere is an error naming the line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dinocell.eval.errors import EvalError
from dinocell.logging.sinks import EVAL_METRICS_FILE, METRICS_FILE

logger = logging.getLogger("dinocell")

KNN_FILE = Path("eval") / "knn.json"
FIGURE_SIZE_PX = (1500, 1000)
FIGURE_DPI = 100
# (title, fields, log-scale y); "*_loss" stands for every field ending in _loss (whatever the meta-arch logs)
PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("losses", ("*_loss",), False),
    ("learning rate", ("lr", "last_layer_lr"), False),
    ("weight decay", ("wd",), False),
    ("teacher temperature", ("teacher_temp",), False),
    ("teacher EMA momentum", ("momentum",), False),
    ("gradient norm (before clipping)", ("grad_norm",), True),
    ("throughput (images/s)", ("images_per_s",), False),
    ("seconds per iteration", ("iter_time", "data_time"), False),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, one per iteration in increasing order, restarts resolved (module docstring)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: skipping the incomplete last line %d (a run stopped while writing it)", path,
                               number)
                continue
            raise EvalError(f"{path}:{number} is not a JSON object ({error}); expected one record per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise EvalError(f"{path}:{number} has no integer 'iteration'; expected a dinocell metrics record")
        iteration = record["iteration"]
        while records and records[-1]["iteration"] >= iteration:  # a restart: later lines supersede these
            records.pop()
        records.append(record)
    return records


def read_eval_curves(run_dir: str | Path, last_iteration: int) -> dict[str, list[tuple[int, float]]]:
    """label -> (iterations done, %) points of the evaluations during training: k-NN top-1 of every k and the
    channel-consistency retrieval top-1 (average over the single channels). From eval/metrics.json; for older runs
    from eval/knn.json ("init" at iteration 0, "final" after the last iteration)."""
    run_dir = Path(run_dir)
    curves: dict[str, list[tuple[int, float]]] = {}
    if (run_dir / EVAL_METRICS_FILE).is_file():
        for record in read_metrics(run_dir / EVAL_METRICS_FILE):
            for field, value in record.items():
                label = _eval_label(field)
                if label is not None:
                    curves.setdefault(label, []).append((record["iteration"], 100.0 * value))
        return curves
    if not (run_dir / KNN_FILE).is_file():
        return curves
    result = json.loads((run_dir / KNN_FILE).read_text())
    points = [(0, result["init"])] if "init" in result else []
    if "final" in result:
        points.append((last_iteration + 1, result["final"]))
    return {f"k-NN top-1 k={result['k']}": points} if points else {}


def _eval_label(field: str) -> str | None:
    """The legend of an eval/metrics.json field that is drawn, else None."""
    if field.startswith("eval/knn_k") and field.endswith("_top1"):
        return f"k-NN top-1 k={field[len('eval/knn_k'):-len('_top1')]}"
    if field == "eval/channel_retrieval_top1":
        return "channel retrieval top-1"
    return None


def _fields(records: list[dict[str, Any]], patterns: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(key for r in records for key in r))
    chosen = []
    for pattern in patterns:
        chosen += [k for k in present if k.endswith(pattern[1:])] if pattern.startswith("*") else [pattern]
    return [k for k in chosen if k in present]


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves (3 x 3 panels, FIGURE_SIZE_PX pixels) to `out` (default RUN_DIR/training_curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}; expected a dinocell run directory (train.output_dir)")
    records = read_metrics(metrics_path)
    if not records:
        raise EvalError(f"{metrics_path} holds no records yet; the first appears after train.log_every iterations")
    evals = read_eval_curves(run_dir, records[-1]["iteration"])
    width, height = FIGURE_SIZE_PX
    fig, axes = plt.subplots(3, 3, figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    for ax, (title, patterns, log_scale) in zip(axes.flat, PANELS):
        fields = _fields(records, patterns)
        for field in fields:
            points = [(r["iteration"], r[field]) for r in records if r.get(field) is not None]
            ax.plot(*zip(*points), label=field, linewidth=1)
        if log_scale and fields:
            ax.set_yscale("log")
        if len(fields) > 1:
            ax.legend(fontsize="x-small")
        if not fields:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(title, fontsize="medium")
    ax = axes.flat[len(PANELS)]
    for label, points in evals.items():
        ax.plot(*zip(*points), marker="o", linestyle="--", label=label)
        for iteration, value in {points[0], points[-1]}:  # the start and the latest value
            ax.annotate(f"{value:.2f}%", (iteration, value), textcoords="offset points", xytext=(0, 6), ha="center")
    if evals:
        ax.margins(x=0.1, y=0.25)
        ax.legend(fontsize="x-small")
    else:
        ax.text(0.5, 0.5, f"no {EVAL_METRICS_FILE}", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_title("evaluation of the teacher (%)", fontsize="medium")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle(f"{run_dir.resolve().name}: {len(records)} records, iterations {records[0]['iteration']}-"
                 f"{records[-1]['iteration']}")
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "training_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=FIGURE_DPI)
    plt.close(fig)
    return out
