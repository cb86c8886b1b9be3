"""Write a local stand-in for a JUMP Cell Painting mirror: FIELDS fields of 5 single-channel uint16 TIFFs (one per
stain, uncompressed, like the gallery's) plus the folder's own load_data.csv, which
`JUMPCellPaintingMultiView:root=DIR` reads. The pixels are random (a smooth background plus noise): the data path's
cost (read, decode, normalise, crop) is that of real fields, the content is not.

For end-to-end speed runs of the JUMP recipe on a machine without the real data (scripts/gpu_check.sh uses it):
    python scripts/synthetic_jump_folder.py /tmp/jump_mirror --fields 96 --size 1080
    dinocell train --config-file configs/train/dinov3_vits8_jump_s3_multiview.yaml --output-dir /tmp/run \
        student.pretrained_weights=null \
        train.dataset_path=JUMPCellPaintingMultiView:root=/tmp/jump_mirror:crops_per_field=4:cache_size=1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from dinocell.data.io.index import STAINS


def write_folder(root: Path, n_fields: int, size: int, seed: int = 0) -> None:
    """n_fields fields (plate "0001", wells A01.., site 1) under root/tiffs and their index root/load_data.csv."""
    (root / "tiffs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    rows = []
    for i in range(n_fields):
        row = {"Metadata_Plate": "0001", "Metadata_Well": f"{'ABCDEFGHIJKLMNOP'[i // 24 % 16]}{i % 24 + 1:02d}",
               "Metadata_Site": i // 384 + 1}
        for c, stain in enumerate(STAINS):
            background = 400 + 300 * np.add.outer(ramp * (c + 1) % 1.0, ramp)
            plane = (background + rng.gamma(2.0, 150.0, (size, size))).astype(np.uint16)
            name = f"field{i:04d}_{stain}.tiff"
            tifffile.imwrite(root / "tiffs" / name, plane)
            row[f"FileName_Orig{stain}"], row[f"PathName_Orig{stain}"] = name, "tiffs"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "load_data.csv", index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("root", type=Path, help="folder to write (created)")
    parser.add_argument("--fields", type=int, default=96, help="number of fields (default 96)")
    parser.add_argument("--size", type=int, default=1080, help="field side in pixels (JUMP: 1080)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    write_folder(args.root, args.fields, args.size)
    megabytes = args.fields * len(STAINS) * args.size**2 * 2 / 1e6
    print(f"wrote {args.fields} fields x {len(STAINS)} stains of {args.size} px ({megabytes:.0f} MB) to {args.root} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
