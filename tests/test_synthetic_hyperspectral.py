"""SyntheticHyperspectral: determinism, layout, and classes separable by the spectrum alone and by the shape alone."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull

from dinocell.data import make_dataset
from dinocell.data.datasets.synthetic_hyperspectral import SyntheticHyperspectral


def test_deterministic_layout_and_wavelengths() -> None:
    ds = SyntheticHyperspectral(size=8, image_size=40, n_bands=24)
    sample = ds[5]
    assert sample["image"].shape == (24, 40, 40) and sample["image"].dtype.is_floating_point
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0  # percentile-normalised
    assert sample["label"] == 1 and sample["meta"]["class_name"] == "class_1" and sample["meta"]["object_cover"] > 0
    raw, abundance = ds.render_cube(5)
    again, _ = SyntheticHyperspectral(size=8, image_size=40, n_bands=24).render_cube(5)
    assert raw.dtype == np.uint16 and np.array_equal(raw, again)
    assert abundance.shape == (40, 40) and abundance.min() >= 0.0 and abundance.max() <= 1.0
    test_raw, _ = SyntheticHyperspectral(size=8, image_size=40, n_bands=24, split="test").render_cube(5)
    assert not np.array_equal(raw, test_raw)
    np.testing.assert_allclose(ds.wavelengths, np.linspace(400, 1000, 24), rtol=1e-6)
    # RGB + UV multispectral: 4 bands at 365 (UV), 460 (blue), 555 (green), 650 nm (red)
    rgbuv = make_dataset("SyntheticHyperspectral:n_bands=4:wavelength_range=365,650:image_size=32:size=4")
    np.testing.assert_allclose(rgbuv.wavelengths, [365, 460, 555, 650])
    assert rgbuv[0]["image"].shape == (4, 32, 32)
    with pytest.raises(IndexError, match="index 8 out of range"):
        ds.render_cube(8)
    with pytest.raises(ValueError, match=r"wavelength_range=\(700.0, 400.0\) must be low,high"):
        SyntheticHyperspectral(wavelength_range=(700.0, 400.0))


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    classes = sorted(set(train_y))
    centroids = np.stack([np.mean([x for x, y in zip(train_x, train_y) if y == c], axis=0) for c in classes])
    predicted = np.argmin(((np.asarray(test_x)[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(np.asarray(classes)[predicted] == np.asarray(test_y)))


def _spectral_feature(image: np.ndarray) -> np.ndarray:
    """From the normalised image only: the main direction of pixel-spectrum variation (object vs background
    contrast per band), sign fixed by the last band; invariant to object count, position and shape."""
    pixels = image.reshape(image.shape[0], -1).T
    direction = np.linalg.svd(pixels - pixels.mean(0), full_matrices=False)[2][0]
    return direction * np.sign(direction[-1])


def _shape_feature(abundance: np.ndarray) -> np.ndarray:
    """Mean elongation (from second moments, blind to 5-fold lobes) and mean solidity (area / convex hull area,
    blind to elongation) of the objects that do not touch the border."""
    labels, n = ndimage.label(abundance > 0.3)
    features = []
    for region in range(1, n + 1):
        ys, xs = np.nonzero(labels == region)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == abundance.shape[0] - 1 or xs.max() == abundance.shape[1] - 1:
            continue
        points = np.stack([ys, xs], axis=1).astype(float)
        eig = np.linalg.eigvalsh(np.cov(points.T))
        features.append([np.sqrt(eig[1] / eig[0]), len(points) / ConvexHull(points + 0.5).volume])
    return np.mean(features, axis=0)


def test_classes_separate_by_spectrum_alone_and_by_shape_alone() -> None:
    sets = {s: SyntheticHyperspectral(size=32, image_size=64, n_bands=32, split=s) for s in ("train", "test")}
    spectral = {s: [_spectral_feature(d[i]["image"].numpy()) for i in range(len(d))] for s, d in sets.items()}
    rendered = {s: [d.render_cube(i) for i in range(len(d))] for s, d in sets.items()}
    shape = {s: [_shape_feature(abundance) for _, abundance in cubes] for s, cubes in rendered.items()}
    labels = {s: [d.label_of(i) for i in range(len(d))] for s, d in sets.items()}
    spectral_accuracy = _nearest_centroid_accuracy(spectral["train"], labels["train"], spectral["test"], labels["test"])
    shape_accuracy = _nearest_centroid_accuracy(shape["train"], labels["train"], shape["test"], labels["test"])
    assert spectral_accuracy >= 0.95, spectral_accuracy
    assert shape_accuracy >= 0.9, shape_accuracy
    # the image brightness is a nuisance (illuminant, gain), not a class cue: far below the features above
    brightness = {s: [[float(raw.mean())] for raw, _ in cubes] for s, cubes in rendered.items()}
    brightness_accuracy = _nearest_centroid_accuracy(brightness["train"], labels["train"], brightness["test"],
                                                     labels["test"])
    assert brightness_accuracy < 0.6
