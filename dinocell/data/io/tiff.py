"""TIFF decoding that keeps the file's bit depth (16-bit microscopy stays uint16) and recognises bad files."""

from __future__ import annotations

import io
import logging

import numpy as np
import tifffile

from dinocell.data.io.bad_files import BadFileError

# tifffile logs a line per broken tag before raising; the caller reports the file once, with its key.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def decode_tiff(data: bytes, key: str) -> np.ndarray:
    """Decode a TIFF from memory to its native dtype, or raise BadFileError(missing|truncated|zero_filled|undecodable).

    Truncation is detected from the strip/tile tables (data promised beyond the end of the file), zero-filled files
    either have no TIFF header or decode to an all-zero image (a real field is never exactly 0 everywhere).
    """
    return decode_tiff_series(data, key)[0]


def decode_tiff_series(data: bytes, key: str) -> tuple[np.ndarray, str]:
    """decode_tiff, plus the axes tifffile reads from the file's layout: e.g. "YX", "QYX" (pages), "YXS" (samples
    per pixel), "CYX" (ImageJ channels). Every page of a multi-page file is checked for truncation."""
    if not data:
        raise BadFileError("truncated", key, "empty file")
    if not np.frombuffer(data, np.uint8).any():
        raise BadFileError("zero_filled", key, f"{len(data)} zero bytes")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            for page in tif.pages:
                end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
                if end > len(data):
                    raise BadFileError("truncated", key, f"image data ends at byte {end}, file has {len(data)}")
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except BadFileError:
        raise
    except Exception as error:  # tifffile raises many types on garbage input; all mean the same here
        raise BadFileError("undecodable", key, f"{type(error).__name__}: {error}") from error
    if not array.any():
        raise BadFileError("zero_filled", key, "all pixels are 0")
    return array, axes
