"""Band cubes from files, as [bands, H, W] arrays in their stored dtype: TIFF, NPY, NPZ and ENVI (.hdr + raw data).

- TIFF: a multi-page file (one band per page), a multi-sample file (N samples per pixel, e.g. RGB + UV) or an ImageJ
  channel stack; the band axis comes from the file's layout (tifffile's series axes).
- NPY / NPZ: a 2-D (one band) or 3-D array; the band axis is the smaller end axis unless told ("first" / "last").
  NPY files are memory-mapped, so selecting a few bands of a large cube reads only those.
- ENVI: the `.hdr` header names the interleave (BSQ, BIL, BIP), dtype and byte order; the raw data file next to it
  (same name, extension .img, .dat, .raw, .bsq, .bil, .bip or none) is memory-mapped through the `spectral` package.

Failures raise BadFileError with a reason, so a dataset counts the file and moves on.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from dinocell.data.io.bad_files import BadFileError
from dinocell.data.io.tiff import decode_tiff_series
from dinocell.errors import MissingDependencyError

CUBE_SUFFIXES = (".tif", ".tiff", ".npy", ".npz", ".hdr")
ENVI_DATA_SUFFIXES = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip")
BandAxis = Literal["auto", "first", "last"]


def require_spectral() -> None:
    """Fail early, with the fix, when ENVI files are to be read without the `spectral` package."""
    try:
        import spectral  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            "reading ENVI (.hdr) cubes needs the 'spectral' package: pip install 'dinocell[envi]' (or spectral)"
        ) from error


def open_cube(path: Path, key: str, band_axis: BandAxis = "auto", npz_key: str | None = None) -> np.ndarray:
    """The cube in `path` as a [bands, H, W] array (a memory map for NPY and ENVI); `key` names it in errors.

    band_axis: "auto" (the file's layout for TIFF and ENVI, the smaller end axis for NPY/NPZ), "first" or "last"
    (not for ENVI, whose header is authoritative). npz_key: the array to read from an NPZ (default: its only array).
    """
    suffix = path.suffix.lower()
    if suffix == ".hdr":
        return _open_envi(path, key)
    try:
        if suffix in (".tif", ".tiff"):
            array, axes = decode_tiff_series(path.read_bytes(), key)
            layout_axis = _tiff_band_axis(axes, key)
        elif suffix == ".npy":
            array, layout_axis = np.load(path, mmap_mode="r", allow_pickle=False), None
        elif suffix == ".npz":
            array, layout_axis = _read_npz(path, key, npz_key), None
        else:
            raise ValueError(f"{key}: unsupported cube file type '{path.suffix}'; expected one of {CUBE_SUFFIXES}")
    except FileNotFoundError as error:
        raise BadFileError("missing", key, str(error)) from error
    except OSError as error:
        raise BadFileError("unreachable", key, f"{type(error).__name__}: {error}") from error
    except (ValueError, EOFError, zipfile.BadZipFile) as error:  # numpy: "mmap length is greater than file size"
        reason = "truncated" if "greater than file size" in str(error) else "undecodable"
        raise BadFileError(reason, key, f"{type(error).__name__}: {error}") from error
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise BadFileError("bad_shape", key, f"expected one cube (2-D or 3-D), got shape {array.shape}")
    axis = {"first": 0, "last": 2}.get(band_axis, layout_axis)
    if axis is None:  # no layout to go by: the smaller end axis (ties: first)
        axis = 2 if array.shape[-1] < array.shape[0] else 0
    return np.moveaxis(array, axis, 0)


def _tiff_band_axis(axes: str, key: str) -> int | None:
    """Index of the band axis in a TIFF series' axes: samples (S) or channels (C), else the one axis besides Y, X."""
    if len(axes) != 3:
        return None  # 2-D, or an error for the caller's shape check
    for code in ("S", "C"):
        if code in axes:
            return axes.index(code)
    others = [i for i, a in enumerate(axes) if a not in "YX"]
    if len(others) != 1:
        raise BadFileError("bad_shape", key, f"TIFF axes {axes!r}: expected one band axis besides Y and X")
    return others[0]


def _read_npz(path: Path, key: str, npz_key: str | None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        names = list(npz.keys())
        if npz_key is None:
            if len(names) != 1:
                raise BadFileError("bad_shape", key, f"NPZ holds arrays {names}; choose one with npz_key=")
            return npz[names[0]]
        if npz_key not in names:
            raise BadFileError("bad_shape", key, f"NPZ has no array {npz_key!r}; it holds {names}")
        return npz[npz_key]


def _open_envi(header: Path, key: str) -> np.ndarray:
    from spectral.io import envi
    from spectral.utilities.errors import SpyException

    data = next((p for s in ENVI_DATA_SUFFIXES if (p := header.with_suffix(s)).is_file() and p != header), None)
    if data is None:
        names = ", ".join(header.stem + s for s in ENVI_DATA_SUFFIXES)
        raise BadFileError("missing", key, f"no ENVI data file next to the header (looked for {names})")
    try:
        image = envi.open(str(header), str(data))
    except (SpyException, OSError, ValueError, KeyError, TypeError) as error:  # spectral's errors on bad headers
        raise BadFileError("undecodable", key, f"{type(error).__name__}: {error}") from error
    if not hasattr(image, "open_memmap"):  # e.g. an ENVI spectral library: spectra, not an image
        raise BadFileError("bad_shape", key, f"ENVI file is a {type(image).__name__}, not an image cube")
    needed = image.offset + image.nrows * image.ncols * image.nbands * image.sample_size
    if (stored := os.path.getsize(data)) < needed:
        raise BadFileError("truncated", key, f"{data.name} has {stored} bytes, the header needs {needed}")
    return image.open_memmap(interleave="bsq")  # [bands, rows, cols], a view of the file whatever its interleave
