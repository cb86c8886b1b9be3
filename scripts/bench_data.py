"""Samples per second of the crop pipeline on one core, with field generation/decoding measured separately.

For each field size, one SyntheticCellPainting field (5 channels, uint16, what a decoded JUMP field looks like) is
rendered once; then, each on its own clock:
  generate   rendering the synthetic uint16 field (the embedded data set's own cost)
  decode     reading the field back from 5 single-channel uint16 TIFFs with tifffile (the JUMP decode cost)
  normalise  uint16 -> float32 and per-channel percentile normalisation (the dataset's per-image step)
  crops      the training transform alone (2 global + N local crops of the default config, views as given)
  crops+collate  the transform plus collate with iBOT masks, per sample, in batches of --batch-size
The crop figures are samples/s of one worker process with one torch thread (the DataLoader worker set-up). Every
figure is given twice, "wall / cpu": per wall-clock second and per CPU second of this process; on a shared, loaded
machine the CPU-second figure is the better estimate of what one free core delivers.

Example (the numbers in docs/benchmarks.md):
    .venv/bin/python scripts/bench_data.py --image-sizes 1080 256 --seconds 5
    .venv/bin/python scripts/bench_data.py --image-sizes 1080 --views mean single all
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tifffile
import torch

from dinocell.config import CROP_GROUPS, load_config
from dinocell.data.datasets.synthetic import SyntheticCellPainting
from dinocell.data.normalize import normalize_image
from dinocell.pipeline.collate import collate_ssl_batch
from dinocell.pipeline.loaders import build_mask_planner, build_ssl_transform


def rate(step: Callable[[int], object], seconds: float, min_calls: int = 3) -> tuple[float, float]:
    """Calls per wall-clock second and per CPU second of step(i) over about `seconds` (after one warm-up call)."""
    step(0)
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - start < seconds:
        step(calls + 1)
        calls += 1
    return calls / (time.perf_counter() - start), calls / (time.process_time() - cpu_start)


def bench_size(size: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    dataset = SyntheticCellPainting(size=16, image_size=size, seed=0)
    raw, _ = dataset.render_field(0)
    results = {"generate": rate(lambda i: dataset.render_field(i % 16), args.seconds, min_calls=1)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"ch{c}.tiff") for c in range(raw.shape[0])]
        for path, plane in zip(paths, raw):
            tifffile.imwrite(path, plane)
        results["decode"] = rate(lambda i: np.stack([tifffile.imread(p) for p in paths]), args.seconds)
    results["normalise"] = rate(
        lambda i: normalize_image(torch.from_numpy(raw.astype(np.float32)), "percentile"), args.seconds
    )
    sample = {"image": normalize_image(torch.from_numpy(raw.astype(np.float32)), "percentile"), "label": 0, "id": "f"}
    views = [f"crops.channel_views.{group}={view}" for group, view in zip(CROP_GROUPS, args.views)]
    cfg = load_config(overrides=[f"student.in_chans={raw.shape[0]}", *views])
    transform = build_ssl_transform(cfg)
    results["crops"] = rate(lambda i: transform(sample, i), args.seconds)
    planner = build_mask_planner(cfg, args.batch_size)
    b = args.batch_size

    def batch(i: int) -> None:
        items = [(transform(sample, i * b + k), i * b + k) for k in range(b)]
        collate_ssl_batch(items, planner, cfg.crops.local_crops_size)

    results["crops+collate"] = tuple(r * b for r in rate(batch, args.seconds, min_calls=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[1080, 256], help="field side lengths in pixels")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the crops+collate figure")
    parser.add_argument(
        "--views", nargs=3, default=["all", "all", "all"], metavar=("GLOBAL1", "GLOBAL2", "LOCAL"),
        help="crops.channel_views of the three crop groups (all, mean or single)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DataLoader worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"crops: 2 x 224 + 8 x 96 (default config), views {args.views}, torch threads {args.threads}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    columns = ["generate", "decode", "normalise", "crops", "crops+collate"]
    print("| field | " + " | ".join(f"{c} /s (wall / cpu)" for c in columns) + " |")
    print("|---|---|---|---|---|---|")
    for size in args.image_sizes:
        figures = bench_size(size, args).values()
        print(f"| 5 x {size} x {size} | " + " | ".join(f"{w:.1f} / {c:.1f}" for w, c in figures) + " |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
