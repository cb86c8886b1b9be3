"""SpectralCubes: every file layout, band selection and binning, per-band normalisation, stats, mean-std, bad files."""

import json

import numpy as np
import pytest
import tifffile
import torch

from dinocell.commands.mean_std import main as mean_std_main
from dinocell.data import make_dataset
from dinocell.data.datasets.spectral_cubes import SpectralCubes, parse_band_ranges
from dinocell.data.datasets.synthetic_hyperspectral import SyntheticHyperspectral

H, W, BANDS = 12, 10, 6


def _cube(seed: int, bands: int = BANDS) -> np.ndarray:
    """[bands, H, W] uint16 with a different level per band, so band order and selection are visible."""
    rng = np.random.default_rng(seed)
    return (rng.integers(1, 1000, (bands, H, W)) + 1000 * np.arange(bands)[:, None, None]).astype(np.uint16)


def _write_envi(path, cube: np.ndarray, interleave: str) -> None:
    envi = pytest.importorskip("spectral.io.envi", reason="pip install spectral (dinocell[envi]) to test ENVI cubes")
    envi.save_image(str(path), np.moveaxis(cube, 0, -1), interleave=interleave, force=True, ext=".img")


def _write_all_layouts(root) -> dict[str, np.ndarray]:
    """The same kind of cube in every supported layout, two classes; returns id -> cube [bands, H, W]."""
    cubes = {}
    writers = {
        "a/pages.tif": lambda p, c: tifffile.imwrite(p, c),  # one band per page
        "a/samples.tiff": lambda p, c: tifffile.imwrite(p, np.moveaxis(c, 0, -1), photometric="minisblack",
                                                        planarconfig="contig"),  # bands as samples per pixel
        "a/imagej.tif": lambda p, c: tifffile.imwrite(p, c, imagej=True),  # ImageJ channel stack
        "a/first.npy": lambda p, c: np.save(p, c),
        "b/last.npy": lambda p, c: np.save(p, np.moveaxis(c, 0, -1)),  # [H, W, bands]: bands = the smaller end axis
        "b/one.npz": lambda p, c: np.savez(p, cube=c),
        "b/bsq.hdr": lambda p, c: _write_envi(p, c, "bsq"),
        "b/bil.hdr": lambda p, c: _write_envi(p, c, "bil"),
        "b/bip.hdr": lambda p, c: _write_envi(p, c, "bip"),
    }
    for seed, (name, write) in enumerate(writers.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cubes[name] = _cube(seed)
        write(root / name, cubes[name])
    return cubes


def test_every_layout_reads_as_bands_first(tmp_path) -> None:
    cubes = _write_all_layouts(tmp_path)
    ds = make_dataset(f"SpectralCubes:root={tmp_path}:normalization=none")
    assert ds.classes == ["a", "b"] and len(ds) == len(cubes) and ds.n_bands == ds.n_channels == BANDS
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].dtype == torch.float32
        np.testing.assert_array_equal(sample["image"].numpy(), cubes[sample["id"]], err_msg=sample["id"])
        assert sample["label"] == ["a", "b"].index(sample["id"][0])
    assert ds.bad_sample_counts()["total"] == 0


def test_rgb_uv_multispectral_tiffs(tmp_path) -> None:
    """4-band RGB + UV images as written by common tools: 4 samples per pixel (RGBA-like) or 4 pages."""
    rng = np.random.default_rng(0)
    rgbuv = rng.integers(1, 255, (4, 16, 16), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "interleaved.tif", np.moveaxis(rgbuv, 0, -1))  # tifffile: RGB + extra sample
    tifffile.imwrite(tmp_path / "planar.tif", rgbuv, photometric="minisblack")
    ds = SpectralCubes(root=tmp_path, normalization="none")
    assert ds.classes == [] and ds.n_bands == 4
    for i in range(2):
        assert ds[i]["label"] == -1
        np.testing.assert_array_equal(ds[i]["image"].numpy(), rgbuv)


def test_band_selection_binning_and_zscore_per_band(tmp_path) -> None:
    cube = _cube(0, bands=9)
    np.save(tmp_path / "c.npy", cube)
    ds = make_dataset(f"SpectralCubes:root={tmp_path}:bands=6-8,0-2,5,4:bin_size=2:normalization=zscore")
    assert ds.band_indices == [6, 7, 8, 0, 1, 2, 5, 4] and ds.n_channels == 4
    selected = cube[[6, 7, 8, 0, 1, 2, 5, 4]].astype(np.float64)
    binned = selected.reshape(4, 2, H, W).mean(axis=1)  # pairs of adjacent selected bands: (6,7) (8,0) (1,2) (5,4)
    mean, std = binned.mean(axis=(1, 2), keepdims=True), binned.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ds[0]["image"].numpy(), (binned - mean) / (std + 1e-6), rtol=1e-4, atol=1e-4)


def test_stats_standardise_after_normalisation_and_mean_std_computes_them(tmp_path) -> None:
    cubes = [_cube(seed) for seed in range(3)]
    for k, cube in enumerate(cubes):
        np.save(tmp_path / f"c{k}.npy", cube)
    dataset = f"SpectralCubes:root={tmp_path}:bands=1-4:bin_size=2:normalization=none"
    out = tmp_path / "stats.json"
    assert mean_std_main([dataset, "--fraction", "1", "--out", str(out), "--num-workers", "0"]) == 0
    stats = json.loads(out.read_text())
    pixels = np.concatenate([c[1:5].astype(np.float64).reshape(2, 2, -1).mean(axis=1) for c in cubes], axis=1)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), rtol=1e-6)
    ds = make_dataset(f"{dataset}:stats={out}")
    expected = (cubes[0][1:5].astype(np.float64).reshape(2, 2, H, W).mean(axis=1)
                - pixels.mean(axis=1)[:, None, None]) / pixels.std(axis=1)[:, None, None]
    np.testing.assert_allclose(ds[0]["image"].numpy(), expected, rtol=1e-4, atol=1e-5)
    # mean-std refuses a dataset that already standardises
    assert mean_std_main([f"{dataset}:stats={out}", "--out", str(tmp_path / "again.json")]) == 2
    with pytest.raises(ValueError, match=r"stats '.*' has 2 channels, but the dataset gives 4 \(after bands= and "
                                         r"bin_size=\); recompute it with `dinocell mean-std`"):
        SpectralCubes(root=tmp_path, bands=["1-4"], stats=out)


def test_keys_are_checked_against_the_cubes(tmp_path) -> None:
    np.save(tmp_path / "c.npy", _cube(0, bands=10))
    with pytest.raises(ValueError, match=r"bands=0-10 selects bands outside the cubes' 10 bands \(valid indices 0-9\)"):
        SpectralCubes(root=tmp_path, bands=["0-10"])
    with pytest.raises(ValueError, match=r"bin_size=4 does not divide the 10 selected bands; choose bin_size among "
                                         r"\[1, 2, 5, 10\] or select a multiple of 4 bands \(e.g. bands=0-7\)"):
        SpectralCubes(root=tmp_path, bin_size=4)
    with pytest.raises(ValueError, match=r"bands item '5-2' is not a band index or an ascending range a-b"):
        SpectralCubes(root=tmp_path, bands=["5-2"])
    with pytest.raises(ValueError, match=r"selects band\(s\) \[3\] more than once"):
        SpectralCubes(root=tmp_path, bands=["0-3", "3"])
    with pytest.raises(ValueError, match=r"bands= is empty"):
        make_dataset(f"SpectralCubes:root={tmp_path}:bands=")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no cubes \(.tif, .tiff, .npy, .npz, .hdr\) under"):
        SpectralCubes(root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"root '.*missing' is not a directory"):
        SpectralCubes(root=tmp_path / "missing")
    assert parse_band_ranges(["7", "0-2"]) == [7, 0, 1, 2]


def test_band_axis_for_cubes_with_more_bands_than_pixels(tmp_path) -> None:
    """[40, 12, 10]: the smaller end axis is not the band axis; band_axis=first says so."""
    cube = _cube(0, bands=40)
    np.save(tmp_path / "c.npy", cube)
    assert SpectralCubes(root=tmp_path).n_bands == 10  # auto guesses [H, W, bands]
    ds = SpectralCubes(root=tmp_path, band_axis="first", normalization="none")
    assert ds.n_bands == 40
    np.testing.assert_array_equal(ds[0]["image"].numpy(), cube)
    np.save(tmp_path / "c.npy", np.moveaxis(cube, 0, -1))
    last = SpectralCubes(root=tmp_path, band_axis="last", normalization="none")
    np.testing.assert_array_equal(last[0]["image"].numpy(), cube)


def test_bad_files_are_counted_and_skipped(tmp_path) -> None:
    good = _cube(0)
    np.save(tmp_path / "0_truncated.npy", good)  # the first file: the band count comes from the next good one
    data = (tmp_path / "0_truncated.npy").read_bytes()
    (tmp_path / "0_truncated.npy").write_bytes(data[: len(data) // 2])
    np.save(tmp_path / "1_good.npy", good)
    tifffile.imwrite(tmp_path / "2_zeros.tif", np.zeros_like(good))
    np.save(tmp_path / "3_other_bands.npy", _cube(1, bands=BANDS + 1))
    (tmp_path / "4_garbage.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "5_two_arrays.npz", a=good, b=good)
    _write_envi(tmp_path / "6_truncated.hdr", good, "bsq")
    raw = (tmp_path / "6_truncated.img").read_bytes()
    (tmp_path / "6_truncated.img").write_bytes(raw[:100])
    _write_envi(tmp_path / "7_no_data.hdr", good, "bsq")
    (tmp_path / "7_no_data.img").unlink()
    np.save(tmp_path / "8_good.npy", good)
    ds = SpectralCubes(root=tmp_path, normalization="none")
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids == ["1_good.npy"] * 2 + ["8_good.npy"] * 7  # each bad file replaced by the next good one
    counts = ds.bad_sample_counts()
    assert (counts["truncated"], counts["zero_filled"], counts["bad_shape"], counts["undecodable"],
            counts["missing"], counts["total"]) == (2, 1, 2, 1, 1, 7)


def test_synthetic_cubes_written_as_files_read_back_identically(tmp_path) -> None:
    """The demo path without a download: SyntheticHyperspectral cubes saved as NPY per class are the same images."""
    synthetic = SyntheticHyperspectral(size=4, image_size=32, n_bands=16)
    for i in range(len(synthetic)):
        raw, _ = synthetic.render_cube(i)
        folder = tmp_path / synthetic.classes[synthetic.label_of(i)]
        folder.mkdir(exist_ok=True)
        np.save(folder / f"{i}.npy", raw)
    ds = SpectralCubes(root=tmp_path)  # percentile per band, as the synthetic dataset
    assert ds.classes == synthetic.classes
    for i in range(len(ds)):
        sample = ds[i]
        expected = synthetic[int(sample["id"].split("/")[1].removesuffix(".npy"))]
        assert sample["label"] == expected["label"]
        torch.testing.assert_close(sample["image"], expected["image"])
