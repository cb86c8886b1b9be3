"""SyntheticCellPainting: sample contract, determinism, 16-bit fields, classes differing in structure, not means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.data import make_dataset
from dinocell.data.datasets.synthetic import ATTRIBUTES, SyntheticCellPainting, phenotype_table


def test_default_string_builds_with_no_keys_and_returns_the_sample_record():
    dataset = make_dataset("SyntheticCellPainting")
    assert isinstance(dataset, SyntheticCellPainting) and len(dataset) == 10000
    assert dataset.classes == ["phenotype_0", "phenotype_1", "phenotype_2", "phenotype_3"]
    sample = make_dataset("SyntheticCellPainting:image_size=64")[5]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (5, 64, 64)
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0  # percentile normalisation by default
    assert sample["label"] == 1 and sample["id"] == "synthetic/train/seed0/5"
    assert sample["meta"]["class_name"] == "phenotype_1" and sample["meta"]["split"] == "train"
    assert sample["meta"]["n_cells"] > 0


def test_fields_are_uint16_with_more_than_8_bits_of_range():
    raw, counts = make_dataset("SyntheticCellPainting:image_size=96").render_field(0)
    assert raw.dtype == np.uint16 and raw.shape == (5, 96, 96)
    assert (raw.reshape(5, -1).max(1) > 1000).all()  # real 16-bit values, not an 8-bit image in a uint16 box
    assert len(np.unique(raw)) > 256
    image = make_dataset("SyntheticCellPainting:image_size=96:normalization=none")[0]["image"]
    assert torch.equal(image, torch.from_numpy(raw.astype(np.float32)))


def test_deterministic_in_seed_split_and_index():
    a = make_dataset("SyntheticCellPainting:image_size=64:size=20")
    b = make_dataset("SyntheticCellPainting:image_size=64:size=20")
    assert torch.equal(a[7]["image"], b[7]["image"])
    assert not torch.equal(a[7]["image"], a[11]["image"])  # same class, another field
    other_seed = make_dataset("SyntheticCellPainting:image_size=64:seed=1")
    test_split = make_dataset("SyntheticCellPainting:image_size=64:split=test")
    assert not torch.equal(a[7]["image"], other_seed[7]["image"])
    assert not torch.equal(a[7]["image"], test_split[7]["image"])
    assert test_split[7]["id"] == "synthetic/test/seed0/7"


def test_phenotype_table_gives_every_class_a_different_level_of_every_attribute():
    for k in (2, 4, 7):
        table = phenotype_table(k)
        assert table.shape == (k, len(ATTRIBUTES))
        for column in table.T:
            assert sorted(column.tolist()) == pytest.approx(np.linspace(0, 1, k).tolist())
    assert np.array_equal(phenotype_table(4), phenotype_table(4))  # fixed, whatever the dataset seed


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="size=0 must be >= 1"):
        SyntheticCellPainting(size=0)
    with pytest.raises(ValueError, match="cell_radius=1.0"):
        SyntheticCellPainting(cell_radius=1.0)
    with pytest.raises(IndexError, match="index 3 out of range"):
        SyntheticCellPainting(size=3)[3]


def _nearest_class_mean_accuracy(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-9
    centroids = np.stack([((train_x - mean) / std)[train_y == k].mean(0) for k in np.unique(train_y)])
    distances = ((((test_x - mean) / std)[:, None] - centroids[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == test_y).mean())


def _structure_features(image: torch.Tensor) -> np.ndarray:
    """Per channel: relative edge strength and autocorrelation at 2 and 6 px (texture and object scale)."""
    centred = image - image.mean((1, 2), keepdim=True)
    var = image.var((1, 2)) + 1e-6
    edges = (image[:, 1:] - image[:, :-1]).abs().mean((1, 2)) / (image.mean((1, 2)) + 1e-3)
    lags = [(centred[:, :, lag:] * centred[:, :, :-lag]).mean((1, 2)) / var for lag in (2, 6)]
    return torch.cat([edges, *lags]).numpy()


@pytest.mark.slow
def test_classes_differ_in_structure_but_not_in_per_channel_means():
    """Means of the model's input separate 4 classes poorly; simple texture statistics separate them well."""
    stats = {}
    for split in ("train", "test"):
        dataset = make_dataset(f"SyntheticCellPainting:image_size=128:split={split}")
        samples = [dataset[i] for i in range(80)]
        labels = np.array([s["label"] for s in samples])
        means = np.stack([s["image"].mean((1, 2)).numpy() for s in samples])
        structure = np.stack([_structure_features(s["image"]) for s in samples])
        stats[split] = (means, structure, labels)
    (m_tr, s_tr, y_tr), (m_te, s_te, y_te) = stats["train"], stats["test"]
    mean_accuracy = _nearest_class_mean_accuracy(m_tr, y_tr, m_te, y_te)
    structure_accuracy = _nearest_class_mean_accuracy(s_tr, y_tr, s_te, y_te)
    print(f"nearest-class-mean accuracy: means {mean_accuracy:.2f}, structure {structure_accuracy:.2f}")
    assert mean_accuracy < 0.7, mean_accuracy  # chance is 0.25; measured ~0.5
    assert structure_accuracy > 0.75 and structure_accuracy > mean_accuracy + 0.15, (structure_accuracy, mean_accuracy)


def test_tiny_fields_render_even_without_cells():
    dataset = make_dataset("SyntheticCellPainting:image_size=3:cell_radius=2:size=40")
    counts = [dataset[i]["meta"]["n_cells"] for i in range(40)]
    assert min(counts) == 0 and max(counts) > 0  # empty fields happen at this size and must not crash
    assert all(dataset[i]["image"].shape == (5, 3, 3) for i in range(3))


def test_plate_layout_is_metadata_only_and_groups_fields_by_class():
    plain = make_dataset("SyntheticCellPainting:image_size=32:cell_radius=6:size=40")
    other = make_dataset("SyntheticCellPainting:image_size=32:cell_radius=6:size=40:sites_per_well=3:plate_format=96:"
                         "control_class=2")
    for i in (0, 7, 39):  # the layout never changes an image or a label
        assert torch.equal(plain[i]["image"], other[i]["image"]) and plain[i]["label"] == other[i]["label"]
    metas = [other.layout_of(i) for i in range(40)]
    wells: dict[tuple[str, str], set[int]] = {}
    for i, meta in enumerate(metas):
        wells.setdefault((meta["plate"], meta["well"]), set()).add(i % 4)
    assert all(len(classes) == 1 for classes in wells.values())  # one perturbation per well
    assert sorted(m["site"] for m in metas if (m["plate"], m["well"]) == ("SYN-train-000", "A01")) == [1, 2, 3]
    assert metas[2]["pert_type"] == "negcon" and metas[1]["pert_type"] == "trt"
    assert metas[5] == {"source": "synthetic", "plate": "SYN-train-000", "well": "A02", "site": 2,
                        "perturbation": "phenotype_1", "pert_type": "trt"}
    assert other[5]["meta"]["well"] == "A02" and other[5]["meta"]["class_name"] == "phenotype_1"
    # 96-well plates: replicate well 24 of the 4 classes starts plate 1
    big = make_dataset("SyntheticCellPainting:size=400:sites_per_well=1:plate_format=96:control_class=none")
    assert big.layout_of(96)["plate"] == "SYN-train-001" and big.layout_of(95)["well"] == "H12"
    assert {big.layout_of(i)["pert_type"] for i in range(8)} == {"trt"}
    with pytest.raises(ValueError, match="control_class=4 must lie in \\[0, 3\\] or be none"):
        make_dataset("SyntheticCellPainting:control_class=4")
