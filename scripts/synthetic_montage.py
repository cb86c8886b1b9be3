"""Save a PNG montage of SyntheticCellPainting: one row per class, one tile per channel (DNA, ER, RNA, AGP, Mito).

    python scripts/synthetic_montage.py --out synthetic.png [--per-class 2] [--dataset "SyntheticCellPainting:..."]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from dinocell.data import make_dataset


def montage(dataset_str: str, per_class: int) -> np.ndarray:
    """uint8 [rows * H, 5 * W]: `per_class` samples of every class, each channel a grey tile of the normalised image."""
    dataset = make_dataset(dataset_str)
    n_classes = len(dataset.classes)
    rows = []
    for k in range(n_classes):
        for j in range(per_class):
            image = dataset[k + j * n_classes]["image"].numpy()
            lo, hi = image.min(), image.max()
            rows.append(np.concatenate(list((image - lo) / max(hi - lo, 1e-6)), axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--per-class", type=int, default=2, help="samples per class (rows)")
    parser.add_argument("--dataset", default="SyntheticCellPainting", help="dataset string")
    args = parser.parse_args(argv)
    Image.fromarray(montage(args.dataset, args.per_class)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
