"""2-D maps of the cls features (UMAP or PCA), coloured by class or by a metadata column (plate, well, source, ...).

UMAP (umap-learn, an optional extra) uses scDINO's settings by default: 30 neighbours, min_dist 0.4, cosine metric on
the L2-normalised features; n_neighbors is capped at N - 1 for small sets. PCA needs nothing beyond torch and is
exact and fast. The map is written as a PNG and the coordinates as CSV (id, x, y, colour value) for other tools.
The features come from dinocell.eval.features.extract, which keeps each sample's id, label and metadata.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinocell.errors import MissingDependencyError
from dinocell.eval.errors import EvalError

METHODS = ("umap", "pca")
FIGURE_SIZE_PX = (800, 600)
FIGURE_DPI = 100
MAX_LEGEND_ENTRIES = 20
MIN_CONTINUOUS_VALUES = 13  # a numeric column with more distinct values than this is drawn with a colour bar


def colour_values(records: Sequence[dict[str, Any]], column: str, classes: Sequence[str] | None = None) -> list[Any]:
    """The value of `column` per record; "label" gives class names when `classes` is known."""
    missing = [r.get("id") for r in records if column not in r]
    if missing:
        available = sorted({key for r in records for key in r} - {"id"})
        closest = difflib.get_close_matches(column, available, n=1)
        hint = f" (closest: {closest[0]!r})" if closest else ""
        raise EvalError(f"colour column {column!r} is missing from {len(missing)} sample(s), e.g. {missing[0]!r}; "
                         f"columns these samples have: {', '.join(available)}{hint}")
    values = [r[column] for r in records]
    if column == "label" and classes:
        return [classes[v] if 0 <= v < len(classes) else "unlabelled" for v in values]
    return values


def embed_2d(
    features: torch.Tensor, method: str = "umap", *, n_neighbors: int = 30, min_dist: float = 0.4, seed: int = 0
) -> np.ndarray:
    """[N, D] features -> [N, 2] float coordinates."""
    if method not in METHODS:
        closest = difflib.get_close_matches(method, METHODS, n=1, cutoff=0.0)[0]
        raise EvalError(f"unknown embedding method {method!r}; expected one of {', '.join(METHODS)} "
                         f"(closest: {closest!r})")
    n = features.shape[0]
    if method == "pca":
        if n < 2:
            raise EvalError(f"a PCA map needs at least 2 samples, got {n}")
        centred = features.double() - features.double().mean(dim=0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return (centred @ vh[:2].T).numpy().astype(np.float32)
    if n < 4:
        raise EvalError(f"UMAP needs at least 4 samples, got {n}; use method 'pca' for fewer")
    try:
        import umap
    except ImportError as error:
        raise MissingDependencyError(
            "UMAP maps need umap-learn: pip install 'dinocell[viz]' (or use method 'pca')"
        ) from error
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, metric="cosine", random_state=seed,
                        n_jobs=1)
    return reducer.fit_transform(features.numpy()).astype(np.float32)


def _is_continuous(values: Sequence[Any]) -> bool:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return numeric and len(set(values)) >= MIN_CONTINUOUS_VALUES


def plot_embedding(coords: np.ndarray, values: Sequence[Any], path: str | Path, *, title: str, column: str) -> Path:
    """Scatter of the 2-D coordinates, FIGURE_SIZE_PX pixels: categories with a legend (up to 20 shown), or a colour
    bar for a numeric column with many values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = FIGURE_SIZE_PX
    fig, ax = plt.subplots(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    size = max(2.0, min(30.0, 3000.0 / len(coords)))
    if _is_continuous(values):
        points = ax.scatter(coords[:, 0], coords[:, 1], c=np.asarray(values, dtype=float), s=size, cmap="viridis")
        fig.colorbar(points, ax=ax, label=column)
        fig.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.08)
    else:
        categories = sorted({str(v) for v in values})
        cmap = plt.get_cmap("tab10" if len(categories) <= 10 else "tab20")
        names = np.array([str(v) for v in values])
        for k, category in enumerate(categories):
            chosen = names == category
            ax.scatter(coords[chosen, 0], coords[chosen, 1], s=size, color=cmap(k % cmap.N),
                       label=category if k < MAX_LEGEND_ENTRIES else None)
        fig.subplots_adjust(left=0.08, right=0.72, top=0.93, bottom=0.08)
        more = f" (first {MAX_LEGEND_ENTRIES} of {len(categories)})" if len(categories) > MAX_LEGEND_ENTRIES else ""
        ax.legend(title=f"{column}{more}", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                  markerscale=max(1.0, 20.0 / size))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def write_coordinates(path: str | Path, records: Sequence[dict], coords: np.ndarray, column: str,
                      values: Sequence[Any]) -> Path:
    """CSV with one row per sample: id, x, y, and the colour column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "x", "y", column])
        for record, (x, y), value in zip(records, coords, values, strict=True):
            writer.writerow([record["id"], f"{x:.6g}", f"{y:.6g}", value])
    return path
