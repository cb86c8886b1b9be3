"""Streaming throughput of JUMPS3MultiView from a local moto S3 server, with and without injected request latency.

A delaying proxy in front of moto adds a fixed latency to every request (S3's first-byte latency is tens of ms); the
dataset should hide it with many requests in flight. Every field is fetched fresh (cache_size=0, crops_per_field=1),
so the numbers are raw download + decode rates, not cache hits. Each configuration runs one untimed pass (worker
start-up) and one timed pass over all fields.

    .venv/bin/python scripts/bench_s3.py --fields 128 --size 540 --latency-ms 0 50 --workers 1 8

Prints a Markdown table (fields/s, MB/s, and the 50 ms / 0 ms ratio). The server, the proxy and the loader share
the machine's cores, so run it on a quiet machine and report `uptime` with the numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import BUCKET, PREFIX, STAINS, FaultyProxy, MotoServer, tiff_bytes  # noqa: E402

from dinocell.data.datasets.jump import JUMPS3MultiView  # noqa: E402


def make_tree(root: Path, n_fields: int, size: int) -> int:
    """One plate of `n_fields` 5-channel uint16 fields with a csv index; returns the bytes of all image files."""
    import pandas as pd

    rng = np.random.default_rng(0)
    source, batch, plate = "source_1", "bench_batch", "BENCH01"
    folder = root / PREFIX / source / "images" / batch / "images" / plate
    folder.mkdir(parents=True)
    rows, total = [], 0
    for f in range(n_fields):
        row = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
               "Metadata_Well": f"A{f // 9 + 1:02d}", "Metadata_Site": str(f % 9 + 1)}  # fmt: skip
        for ch, stain in enumerate(STAINS, start=1):
            data = tiff_bytes(rng.integers(100, 60000, (size, size), dtype=np.uint16))
            name = f"field{f:04d}-ch{ch}.tiff"
            (folder / name).write_bytes(data)
            total += len(data)
            row[f"FileName_Orig{stain}"], row[f"PathName_Orig{stain}"] = name, f"s3://{BUCKET}/{folder.relative_to(root)}"
        rows.append(row)
    index = root / PREFIX / source / "workspace" / "load_data_csv" / batch / plate
    index.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(index / "load_data.csv", index=False)
    return total


def timed_pass(endpoint: str, workers: int, batch_size: int, concurrency: int) -> tuple[int, float]:
    ds = JUMPS3MultiView(
        endpoint_url=endpoint, cache_size=0, concurrency=concurrency, normalization="none", retries=5
    )
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list, persistent_workers=True)
    for _ in loader:  # untimed: worker start-up, client creation
        pass
    start = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    return n, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fields", type=int, default=128, help="fields in the bucket (5 TIFFs each)")
    parser.add_argument("--size", type=int, default=540, help="field side in pixels (real JUMP: 970-1080)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0], help="injected latencies")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=16, help="fields per batch (one __getitems__ call)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per worker")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on a small CI box

    with tempfile.TemporaryDirectory() as tmp, MotoServer() as server:
        total_bytes = make_tree(Path(tmp), args.fields, args.size)
        server.publish(Path(tmp))
        mb_per_field = total_bytes / args.fields / 1e6
        print(f"{args.fields} fields of 5 x {args.size}^2 uint16 ({mb_per_field:.2f} MB/field), "
              f"batch {args.batch_size}, concurrency {args.concurrency} per worker\n")  # fmt: skip
        print("| workers | latency (ms) | fields/s | MB/s | vs 0 ms |")
        print("|---|---|---|---|---|")
        for workers in args.workers:
            base = None
            for latency in args.latency_ms:
                with FaultyProxy(server.port, delay_s=latency / 1000) as proxy:
                    n, seconds = timed_pass(proxy.endpoint, workers, args.batch_size, args.concurrency)
                rate = n / seconds
                base = rate if base is None else base
                print(f"| {workers} | {latency:g} | {rate:.1f} | {rate * mb_per_field:.1f} | {rate / base:.0%} |",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
