"""CTDataset: HU window, slice and mask channels, slab selection, sample mask, bad files; masked local crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinocell.data import make_dataset
from dinocell.data.datasets.ct import CTDataset, hu_to_unit

# Shared by the recipe runs of test_ct, test_jump_s3 and test_single_cell: shrink any recipe to seconds on a CPU.
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "train"
TINY_RUN = [
    "student.arch=vit_test", "student.drop_path_rate=0.0", "student.n_storage_tokens=4",
    "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "train.batch_size_per_gpu=4",
    "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=2", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
    "optim.freeze_last_layer_epochs=0", "train.log_every=1", "checkpointing.period=4",
    "evaluation.eval_period_iterations=0", "compute_precision.autocast_dtype=fp32",
]  # fmt: skip


def write_volume(path, depth=5, size=40, slices_last=False, seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1500, 1500, (depth, size, size)).astype(np.int16)
    lung = np.zeros((depth, size, size), bool)
    for z in range(depth):
        lung[z, 5 + z : 20 + z, 8:30] = True  # a different blob per slice
    if slices_last:
        hu, lung = np.moveaxis(hu, 0, -1), np.moveaxis(lung, 0, -1)
    np.savez_compressed(path, array=hu, mask=lung)
    return np.moveaxis(hu, -1, 0) if slices_last else hu, np.moveaxis(lung, -1, 0) if slices_last else lung


def test_hu_window_maps_to_eps_range():
    hu = np.array([-3000, -1000, -425, 150, 3000], np.float32)
    out = hu_to_unit(hu, (-1000.0, 150.0), eps=1e-3)
    np.testing.assert_allclose(out, [1e-3, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-3], rtol=1e-6)


def test_slab_channels_mask_and_layouts(tmp_path):
    hu, lung = write_volume(tmp_path / "a.npz", depth=5, size=40)
    (tmp_path / "sub").mkdir()
    _, lung_b = write_volume(tmp_path / "sub" / "b.npz", depth=3, size=36, slices_last=True, seed=1)
    ds = make_dataset(f"CTDataset:npz_dir_path={tmp_path}:patch_size=32,32,6:hu_window=-1000,150")
    assert len(ds) == 2 and ds[0]["id"] == "a.npz" and ds[1]["id"] == "sub/b.npz"
    sample = ds[0]
    image, mask = sample["image"], sample["mask"]
    assert image.shape == (6, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (1, 32, 32) and mask.dtype == torch.bool
    centre_hu, centre_lung = hu[1:4, 4:36, 4:36], lung[1:4, 4:36, 4:36]  # central 3 of 5 slices, centre crop
    np.testing.assert_allclose(image[:3].numpy(), hu_to_unit(centre_hu, (-1000, 150), 1e-3), rtol=1e-6)
    assert torch.equal(image[3:], torch.from_numpy(centre_lung.astype(np.float32)))
    assert torch.equal(mask[0], torch.from_numpy(centre_lung.any(0)))  # union of the slab's mask slices
    assert image[:3].min() >= 1e-3 and image[:3].max() <= 1 - 1e-3
    other = ds[1]["image"]  # slices-last file, 36 px centre-cropped to 32
    assert torch.equal(other[3:], torch.from_numpy(lung_b[:, 2:34, 2:34].astype(np.float32)))


def test_bad_files_are_skipped_and_counted(tmp_path):
    write_volume(tmp_path / "a_good.npz")
    (tmp_path / "b_truncated.npz").write_bytes((tmp_path / "a_good.npz").read_bytes()[:100])
    np.savez(tmp_path / "c_nomask.npz", array=np.zeros((3, 40, 40)))
    np.savez(tmp_path / "d_small.npz", array=np.zeros((3, 8, 8)), mask=np.zeros((3, 8, 8)))
    ds = CTDataset(npz_dir_path=tmp_path, patch_size=(32, 32, 6))
    assert [ds[i]["id"] for i in range(4)] == ["a_good.npz"] * 4
    assert ds[2]["meta"] == {"substituted_for": "c_nomask.npz", "bad_reason": "undecodable"}
    counts = ds.bad_sample_counts()
    assert counts["undecodable"] == 2 and counts["bad_shape"] == 1 and counts["total"] == 3


def test_invalid_arguments_name_the_value(tmp_path):
    write_volume(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="channels=5 must be even"):
        CTDataset(npz_dir_path=tmp_path, patch_size=(32, 32, 5))
    with pytest.raises(ValueError, match="hu_window"):
        CTDataset(npz_dir_path=tmp_path, hu_window=(150.0, -1000.0))


def test_half_of_the_local_crops_are_masked(tmp_path):
    from dinocell.config import load_config
    from dinocell.pipeline.loaders import build_ssl_transform

    hu = np.full((3, 48, 48), -400, np.int16)
    lung = np.zeros((3, 48, 48), bool)
    lung[:, 20:26, 20:26] = True  # smaller than any local crop: every masked crop has zeroed pixels
    np.savez(tmp_path / "v.npz", array=hu, mask=lung)
    sample = CTDataset(npz_dir_path=tmp_path, patch_size=(48, 48, 6))[0]
    overrides = [
        "student.in_chans=6", "student.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
        "crops.local_crops_number=4", "crops.local_masked_crops_fraction=0.5", "crops.photometric_aug=false",
    ]  # fmt: skip
    transform = build_ssl_transform(load_config(overrides=overrides))
    for position in range(3):
        crops = transform(sample, position)["local_crops"]
        zeroed = [bool((crop[0] == 0).any()) for crop in crops]
        assert zeroed == [True, True, False, False]  # HU channels are >= eps unless masked out


@pytest.mark.slow
def test_ct_smoke_recipe_trains(tmp_path):
    import json

    from dinocell.config import load_config
    from dinocell.train.train import train

    (tmp_path / "npz").mkdir()
    for i in range(3):
        write_volume(tmp_path / "npz" / f"v{i}.npz", depth=4, size=72, seed=i)
    overrides = [
        f"train.dataset_path='CTDataset:npz_dir_path={tmp_path / 'npz'}:patch_size=64,64,6'",
        f"train.output_dir={tmp_path / 'run'}", "student.n_storage_tokens=1", "train.batch_size_per_gpu=2",
        "train.OFFICIAL_EPOCH_LENGTH=2", "crops.global_crops_size=32", "crops.local_crops_size=16",
    ]  # fmt: skip
    cfg = load_config(RECIPES / "ct_smoke.yaml", overrides)
    assert cfg.crops.local_masked_crops_fraction == 0.5 and not cfg.crops.photometric_aug and cfg.student.in_chans == 6
    train(cfg, resume=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert len(records) == 4 and all(np.isfinite(r["total_loss"]) for r in records)
