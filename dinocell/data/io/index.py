"""Cell Painting load_data indexes (csv, csv.gz, parquet): the per-plate truth of which file holds which stain.

File names differ by microscope (Phenix `r01c01f01p01-ch1...`, Yokogawa, ImageXpress) and channel numbers differ by
source, so channels are only ever resolved by stain name through the `FileName_Orig<Stain>` / `PathName_Orig<Stain>`
or `URL_Orig<Stain>` columns. Locations are strings: `s3://bucket/key` or an absolute local path.
"""

from __future__ import annotations

import difflib
import io
import posixpath
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd

from dinocell.data.dataset import DatasetError

STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
# One index per plate folder is read; the first present name in this order wins (they list the same fields).
INDEX_NAMES = (
    "load_data_with_illum.parquet",
    "load_data.parquet",
    "load_data_with_illum.csv.gz",
    "load_data.csv.gz",
    "load_data_with_illum.csv",
    "load_data.csv",
)
KEY_COLUMNS = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Site")


@dataclass(frozen=True)
class FieldRecord:
    """One imaged site: `key` = "source/batch/plate/well/site", one file location per selected channel."""

    key: str
    files: tuple[str, ...]
    illum: tuple[str, ...] | None  # illumination-function locations per channel, when the index names them


def read_index_table(data: bytes, name: str) -> pd.DataFrame:
    """Parse one index file; every `Metadata_*` column comes back as strings (plate "0123" must stay "0123")."""
    if name.endswith(".parquet"):
        table = pd.read_parquet(io.BytesIO(data))
        for column in [c for c in table.columns if c.startswith("Metadata_")]:
            table[column] = [_as_text(v) for v in table[column]]
        return table
    if name.endswith((".csv", ".csv.gz")):
        dtypes = {c: str for c in KEY_COLUMNS}
        compression = "gzip" if name.endswith(".gz") else None
        table = pd.read_csv(io.BytesIO(data), compression=compression, dtype=dtypes, keep_default_na=False)
        for column in [c for c in table.columns if c.startswith("Metadata_")]:
            table[column] = table[column].astype(str)
        return table
    raise DatasetError(f"index file '{name}' is not .csv, .csv.gz or .parquet")


def pick_index_files(names: list[str]) -> list[str]:
    """Keep one index file per folder (by INDEX_NAMES preference); names are '/'-separated locations."""
    by_folder: dict[str, list[str]] = {}
    for name in names:
        if posixpath.basename(name) in INDEX_NAMES:
            by_folder.setdefault(posixpath.dirname(name), []).append(name)
    rank = {n: i for i, n in enumerate(INDEX_NAMES)}
    return [min(files, key=lambda n: rank[posixpath.basename(n)]) for _, files in sorted(by_folder.items())]


def resolve_stains(columns: list[str], channels: list[str], index_name: str) -> list[str]:
    """Map requested stain names (case-insensitive) to the spelling the index uses; error on an unknown stain."""
    available = sorted({c.split("Orig", 1)[1] for c in columns if c.startswith(("FileName_Orig", "URL_Orig"))})
    lower = {s.lower(): s for s in available}
    resolved = []
    for channel in channels:
        if channel.lower() not in lower:
            close = difflib.get_close_matches(channel, available, n=1)
            hint = f"; closest: '{close[0]}'" if close else ""
            raise DatasetError(
                f"channel '{channel}' is not in index {index_name}; its stains are {', '.join(available)}{hint}"
            )
        resolved.append(lower[channel.lower()])
    return resolved


def fields_from_table(
    table: pd.DataFrame, channels: list[str], index_location: str, defaults: dict[str, str]
) -> list[FieldRecord]:
    """Turn index rows into FieldRecords; `defaults` fills key parts the table lacks (e.g. source from the path)."""
    stains = resolve_stains(list(table.columns), channels, index_location)
    parts = []
    for column in KEY_COLUMNS:
        if column in table.columns:
            parts.append(table[column].tolist())
        elif column in defaults:
            parts.append([defaults[column]] * len(table))
        else:
            raise DatasetError(f"index {index_location} has no column {column} (columns: {', '.join(table.columns)})")
    files = [_locations(table, stain, "Orig", index_location) for stain in stains]
    has_illum = all(f"FileName_Illum{s}" in table.columns or f"URL_Illum{s}" in table.columns for s in stains)
    illum = [_locations(table, s, "Illum", index_location) for s in stains] if has_illum else None
    return [
        FieldRecord(
            key="/".join(p[row] for p in parts),
            files=tuple(f[row] for f in files),
            illum=tuple(i[row] for i in illum) if illum else None,
        )
        for row in range(len(table))
    ]


def join_location(folder: str, file_name: str, index_location: str) -> str:
    """Resolve a PathName/FileName pair: URLs and absolute paths as given, relative ones next to the index file."""
    folder = _s3_url(folder)
    if folder.startswith("s3://") or PurePosixPath(folder).is_absolute():
        return posixpath.join(folder, file_name)
    if index_location.startswith("s3://"):
        bucket, key = split_s3_url(index_location)
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(posixpath.dirname(key), folder, file_name))
    return posixpath.normpath(posixpath.join(posixpath.dirname(index_location), folder, file_name))


def split_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not url.startswith("s3://"):
        raise DatasetError(f"'{url}' is not an s3://bucket/key URL")
    bucket, _, key = url[5:].partition("/")
    return bucket, key


def _locations(table: pd.DataFrame, stain: str, kind: str, index_location: str) -> list[str]:
    if f"URL_{kind}{stain}" in table.columns:
        return [join_location(u, "", index_location).rstrip("/") for u in table[f"URL_{kind}{stain}"].astype(str)]
    names = table[f"FileName_{kind}{stain}"].astype(str)
    folders = table[f"PathName_{kind}{stain}"].astype(str) if f"PathName_{kind}{stain}" in table.columns else None
    if folders is None:
        return [join_location("", n, index_location) for n in names]
    return [join_location(p, n, index_location) for p, n in zip(folders, names)]


def _s3_url(location: str) -> str:
    """Virtual-host and path-style https URLs of S3 objects -> s3://bucket/key; anything else unchanged."""
    for marker in (".s3.amazonaws.com/", ".s3.us-east-1.amazonaws.com/"):
        if location.startswith("https://") and marker in location:
            bucket, _, key = location[len("https://") :].partition(marker)
            return f"s3://{bucket}/{key}"
    if location.startswith("https://s3.amazonaws.com/"):
        return "s3://" + location[len("https://s3.amazonaws.com/") :]
    return location


def _as_text(value: object) -> str:
    """Parquet may store sites/plates as numbers: 1.0 -> '1', 7 -> '7'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
