"""ImageFolder: classes from folders, 8/16-bit scaling without precision loss, channel conversion, corrupt files."""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from dinocell.data import make_dataset
from dinocell.data.datasets.image_folder import _to_unit_range
from dinocell.data.io.bad_files import is_substitute


def _folder(root: pathlib.Path) -> dict[str, np.ndarray]:
    """Two classes with one file of each kind; returns the pixel arrays written, by relative path."""
    rng = np.random.default_rng(0)
    arrays = {
        "cats/rgb8.png": rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
        "cats/grey8.jpg": np.full((12, 10), 128, np.uint8),
        "cats/nested/rgba8.png": rng.integers(0, 256, (12, 10, 4), dtype=np.uint8),
        "dogs/grey16.png": rng.integers(0, 65536, (12, 10), dtype=np.uint16),
        "dogs/grey16.tif": rng.integers(0, 65536, (12, 10), dtype=np.uint16),
        "dogs/rgb16.tiff": rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16),
    }
    for rel, array in arrays.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".tif", ".tiff"):
            tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack")
        else:
            Image.fromarray(array).save(path)
    (root / "dogs/notes.txt").write_text("not an image")
    return arrays


def test_classes_labels_ids_and_values(tmp_path):
    arrays = _folder(tmp_path)
    dataset = make_dataset(f"ImageFolder:root={tmp_path}")
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 6 and dataset.bad_sample_counts()["total"] == 0
    samples = {s["id"]: s for s in (dataset[i] for i in range(len(dataset)))}
    assert {k: s["label"] for k, s in samples.items()} == {k: 0 if k.startswith("cats") else 1 for k in arrays}
    for sample in samples.values():
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 12, 10)
        assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    rgb = torch.from_numpy(arrays["cats/rgb8.png"].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(samples["cats/rgb8.png"]["image"], rgb)
    assert torch.equal(samples["cats/nested/rgba8.png"]["image"], torch.from_numpy(
        arrays["cats/nested/rgba8.png"][..., :3].transpose(2, 0, 1).astype(np.float32) / 255))


@pytest.mark.parametrize("name", ["dogs/grey16.png", "dogs/grey16.tif", "dogs/rgb16.tiff"])
def test_16_bit_files_keep_16_bit_precision(tmp_path, name):
    arrays = _folder(tmp_path)
    dataset = make_dataset(f"ImageFolder:root={tmp_path}")
    image = next(dataset[i]["image"] for i in range(len(dataset)) if dataset[i]["id"] == name)
    expected = arrays[name].astype(np.float32) / 65535
    expected = np.repeat(expected[None], 3, 0) if expected.ndim == 2 else expected.transpose(2, 0, 1)
    assert torch.equal(image, torch.from_numpy(expected))
    assert len(torch.unique(image)) > 100  # 8-bit quantisation would leave at most 256 levels, here ~120 pixels differ


def test_bit_depth_scaling_ignores_byte_order():
    for dtype, top in ((">u2", 65535), ("<u2", 65535), ("u1", 255)):
        scaled = _to_unit_range(np.array([0, 1, top], dtype=dtype))
        assert scaled.dtype == np.float32 and scaled.tolist() == [0.0, np.float32(1 / top), 1.0]
    with pytest.raises(ValueError, match="unsupported pixel type int32"):
        _to_unit_range(np.array([70000], dtype=np.int32))


def test_one_channel_uses_luma_and_keeps_grey(tmp_path):
    arrays = _folder(tmp_path)
    dataset = make_dataset(f"ImageFolder:root={tmp_path}:channels=1")
    samples = {dataset[i]["id"]: dataset[i]["image"] for i in range(len(dataset))}
    assert all(image.shape == (1, 12, 10) for image in samples.values())
    luma = arrays["cats/rgb8.png"].astype(np.float32) / 255 @ np.array([0.299, 0.587, 0.114], np.float32)
    torch.testing.assert_close(samples["cats/rgb8.png"][0], torch.from_numpy(luma))
    assert torch.equal(samples["dogs/grey16.png"][0], torch.from_numpy(arrays["dogs/grey16.png"] / np.float32(65535)))


def test_corrupt_files_are_skipped_counted_and_warned_never_crash(tmp_path, caplog):
    _folder(tmp_path)
    (tmp_path / "cats/garbage.png").write_bytes(b"this is not a png")
    good = tmp_path / "dogs/truncated.png"
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(good)
    good.write_bytes(good.read_bytes()[:60])  # the header opens, the pixels do not decode
    dataset = make_dataset(f"ImageFolder:root={tmp_path}")
    assert len(dataset) == 8  # files are only opened when read: no scan of a million-image folder up front
    names = [p.name for p, _ in dataset.samples]
    for bad in ("garbage.png", "truncated.png"):
        with caplog.at_level(logging.WARNING, logger="dinocell.data"):
            sample = dataset[names.index(bad)]
        assert bad in caplog.text and sample["id"] != bad and sample["image"].shape == (3, 12, 10)
        assert sample["meta"]["substituted_for"].endswith(bad) and is_substitute(sample)
    assert dataset.bad_sample_counts()["undecodable"] == 2 and dataset.bad_sample_counts()["total"] == 2


def test_flat_folder_is_unlabelled_and_errors_name_the_problem(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    dataset = make_dataset(f"ImageFolder:root={tmp_path}")
    assert dataset.classes == [] and dataset[0]["label"] == -1 and dataset[0]["id"] == "a.png"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        make_dataset(f"ImageFolder:root={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        make_dataset(f"ImageFolder:root={tmp_path / 'empty'}")
