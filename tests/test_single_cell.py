"""SingleCellFolder (scDINO): labels from folders, TIFF layouts, channel selection, min-max, stats JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from dinocell.data import make_dataset
from dinocell.data.dataset import DatasetError
from dinocell.data.datasets.single_cell import SingleCellFolder, channels_first


def make_cells(root, layout="last", n_per_class=3, channels=5, size=12, nested=False):
    """root/<class>/[plate/]cell_k.tif with uint16 values; returns {relative id: [C, H, W] array}."""
    rng = np.random.default_rng(0)
    written = {}
    for cls in ("B_cell", "T_cell"):
        for k in range(n_per_class):
            chw = rng.integers(100, 40000, (channels, size, size)).astype(np.uint16)
            chw[2] = 7  # a flat channel: min-max gives 0
            folder = root / cls / "plate1" if nested else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            name = f"cell_{k}.tiff" if k % 2 else f"cell_{k}.tif"
            tifffile.imwrite(folder / name, np.moveaxis(chw, 0, -1) if layout == "last" else chw)
            written[(folder / name).relative_to(root).as_posix()] = chw
    return written


def minmax(chw):
    x = chw.astype(np.float64)
    lo, hi = x.min((1, 2), keepdims=True), x.max((1, 2), keepdims=True)
    return np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1), 0.0)


@pytest.mark.parametrize("layout", ["last", "first"])
def test_labels_channels_and_minmax(tmp_path, layout):
    written = make_cells(tmp_path, layout)
    ds = make_dataset(f"scDINO:root={tmp_path}:channels=4,0,2")
    assert ds.classes == ["B_cell", "T_cell"] and len(ds) == 6
    for i in range(len(ds)):
        sample = ds[i]
        expected = minmax(written[sample["id"]])[[4, 0, 2]]
        assert sample["label"] == (0 if sample["id"].startswith("B_cell") else 1)
        assert sample["image"].shape == (3, 12, 12)
        np.testing.assert_allclose(sample["image"].numpy(), expected, atol=1e-6)
        assert float(sample["image"][2].abs().max()) == 0.0  # flat channel stays 0


def test_label_depth_and_bad_channel_index(tmp_path):
    make_cells(tmp_path, nested=True)
    assert SingleCellFolder(root=tmp_path).classes == ["plate1"]
    assert SingleCellFolder(root=tmp_path, label_depth=1).classes == ["B_cell", "T_cell"]
    with pytest.raises(ValueError, match="no class folder 2 level"):
        SingleCellFolder(root=tmp_path, label_depth=2)
    # a wrong channel selection fails every file: the run stops with the reason instead of training on nothing
    with pytest.raises(DatasetError, match=r"channels=\[7\] but the file has 5 channels \(valid indices 0..4\)"):
        SingleCellFolder(root=tmp_path, channels=[7])[0]


def test_stats_json_applied_after_minmax(tmp_path):
    written = make_cells(tmp_path / "data")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": [0.5, 0.25], "std": [0.2, 0.1]}))
    ds = SingleCellFolder(root=tmp_path / "data", channels=[0, 1], stats=stats)
    sample = ds[0]
    mean, std = np.array([0.5, 0.25]).reshape(2, 1, 1), np.array([0.2, 0.1]).reshape(2, 1, 1)
    expected = (minmax(written[sample["id"]])[:2] - mean) / std
    np.testing.assert_allclose(sample["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="has 2 channels, but channels=\\[0, 1, 3\\] selects 3"):
        SingleCellFolder(root=tmp_path / "data", channels=[0, 1, 3], stats=stats)


def test_undecodable_file_is_skipped_and_counted(tmp_path):
    make_cells(tmp_path, n_per_class=2)
    (tmp_path / "B_cell" / "cell_0.tif").write_bytes(b"not a tiff")
    ds = SingleCellFolder(root=tmp_path)
    assert ds[0]["id"] == "B_cell/cell_1.tiff" and ds.bad_sample_counts()["undecodable"] == 1
    assert ds[0]["meta"] == {"substituted_for": "B_cell/cell_0.tif", "bad_reason": "undecodable"}
    assert "meta" not in ds[1]


def test_blank_and_odd_files_are_skipped_never_trained_on(tmp_path):
    make_cells(tmp_path, n_per_class=3)
    files = sorted((tmp_path / "B_cell").iterdir())
    tifffile.imwrite(files[0], np.zeros((12, 12, 5), np.uint16))  # a blank placeholder crop
    tifffile.imwrite(files[1], np.ones((12, 12, 2), np.uint16))  # only 2 channels
    ds = SingleCellFolder(root=tmp_path, channels=[0, 4])
    assert ds[0]["id"] == files[2].relative_to(tmp_path).as_posix()
    counts = ds.bad_sample_counts()
    assert counts["zero_filled"] == 1 and counts["bad_shape"] == 1 and counts["total"] == 2


def test_channels_first_detection():
    assert channels_first(np.zeros((20, 20, 5))).shape == (5, 20, 20)
    assert channels_first(np.zeros((5, 20, 20))).shape == (5, 20, 20)
    assert channels_first(np.zeros((20, 20))).shape == (1, 20, 20)
    tie = np.arange(27).reshape(3, 3, 3)
    assert np.array_equal(channels_first(tie), tie)  # ties are read as channel-first


@pytest.mark.slow
def test_scdino_recipe_mean_std_then_training_with_knn(tmp_path):
    """The scDINO pipeline: mean-std JSON -> crops.channel_mean/std -> a few iterations with k-NN at start and end."""
    from test_ct import RECIPES, TINY_RUN

    from dinocell.commands.mean_std import main as mean_std_main
    from dinocell.config import load_config
    from dinocell.train.train import train

    make_cells(tmp_path / "cells", n_per_class=6, size=32)
    dataset = f"SingleCellFolder:root={tmp_path / 'cells'}:channels=0,1,3"
    assert mean_std_main([dataset, "--fraction", "0.5", "--out", str(tmp_path / "stats.json"), "--num-workers=0"]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    overrides = TINY_RUN + [
        f"train.dataset_path='{dataset}'", f"evaluation.knn_train_dataset='{dataset}'",
        f"evaluation.knn_test_dataset='{dataset}'", "evaluation.knn_k=[3]", "student.in_chans=3",
        f"crops.channel_mean={stats['mean']}", f"crops.channel_std={stats['std']}", "train.num_workers=0",
        "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
        f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cfg = load_config(RECIPES / "scdino_vits16.yaml", overrides)
    assert list(cfg.crops.brightness_range) == [0.5, 1.25] and not cfg.crops.rgb_color_aug
    train(cfg, resume=False)
    knn = json.loads((tmp_path / "run" / "eval" / "knn.json").read_text())
    assert 0.0 <= knn["init"] <= 100.0
    assert len((tmp_path / "run" / "training_metrics.json").read_text().splitlines()) == 4
