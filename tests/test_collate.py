"""Collate contract (crop-major stacking, mask indices and weights) and the loader stream: independent of the number
of workers, two ranks = one rank, resume = skip, batch-concurrent datasets get whole batches."""

import itertools
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

import dinocell
from dinocell.data.collate import collate_ssl_batch
from dinocell.data.loaders import build_ssl_loader_from_config

DEFAULT_YAML = Path(dinocell.__file__).parent / "configs" / "ssl_default_config.yaml"


def fake_sample(index: int, n_local: int) -> dict:
    """Crops filled with 100*index + crop number, so their place in the batch can be read back."""
    return {
        "global_crops": [torch.full((2, 8, 8), 100.0 * index + c) for c in range(2)],
        "local_crops": [torch.full((2, 4, 4), 100.0 * index + 10 + c) for c in range(n_local)],
        "label": index % 3,
        "id": f"id{index}",
        "position": 40 + index,
    }


def fixed_masks(positions: list[int]) -> torch.Tensor:
    masks = torch.zeros(2 * len(positions), 4, dtype=torch.bool)
    masks[0, :3] = True  # crop 1 of image 0: 3 patches
    masks[len(positions) + 1, 1] = True  # crop 2 of image 1: 1 patch
    return masks


def test_collate_stacks_crop_major_with_mask_indices_and_weights():
    batch = collate_ssl_batch([fake_sample(i, 3) for i in range(2)], fixed_masks, local_crops_size=4)
    assert batch["collated_global_crops"].shape == (4, 2, 8, 8)
    assert batch["collated_global_crops"][:, 0, 0, 0].tolist() == [0.0, 100.0, 1.0, 101.0]
    assert batch["collated_local_crops"].shape == (6, 2, 4, 4)
    assert batch["collated_local_crops"][:, 0, 0, 0].tolist() == [10.0, 110.0, 11.0, 111.0, 12.0, 112.0]
    assert batch["mask_indices_list"].tolist() == [0, 1, 2, 3 * 4 + 1]
    torch.testing.assert_close(batch["masks_weight"], torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert batch["n_masked_patches"].tolist() == [4] and batch["n_masked_patches"].dtype == torch.int64
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.int64
    assert batch["ids"] == ["id0", "id1"] and batch["positions"].tolist() == [40, 41]


def test_collate_without_local_crops_gives_an_empty_tensor_of_the_right_shape():
    batch = collate_ssl_batch([fake_sample(i, 0) for i in range(3)], fixed_masks, local_crops_size=4)
    assert batch["collated_local_crops"].shape == (0, 2, 4, 4)


class TinyFields(Dataset):
    """Deterministic random 3-channel fields; records the batches asked for through __getitems__."""

    def __init__(self, n: int = 13) -> None:
        self.n = n
        self.batched_calls: list[list[int]] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        image = torch.rand(3, 48, 56, generator=torch.Generator().manual_seed(index))
        return {"image": image, "label": index % 4, "id": f"f{index}"}


class BatchedFields(TinyFields):
    def __getitems__(self, indices: list[int]) -> list[dict]:
        self.batched_calls.append(list(indices))
        return [self[i] for i in indices]


def loader_cfg(batch: int, workers: int = 0):
    overrides = [
        f"train.batch_size_per_gpu={batch}",
        f"train.num_workers={workers}",
        "student.in_chans=3",
        "student.patch_size=8",
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        "crops.local_crops_number=2",
    ]
    return OmegaConf.merge(OmegaConf.load(DEFAULT_YAML), OmegaConf.from_dotlist(overrides))


def batches(cfg, n: int, *, rank: int = 0, world_size: int = 1, start_iter: int = 0, dataset=None) -> list[dict]:
    loader = build_ssl_loader_from_config(
        cfg, dataset or TinyFields(), rank=rank, world_size=world_size, start_iter=start_iter
    )
    return list(itertools.islice(iter(loader), n))


def assert_same(a: dict, b: dict) -> None:
    for key, value in a.items():
        assert (torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]), key


def test_batches_do_not_depend_on_the_number_of_workers():
    serial = batches(loader_cfg(4, workers=0), 3)
    parallel = batches(loader_cfg(4, workers=2), 3)
    for a, b in zip(serial, parallel):
        assert_same(a, b)
    assert serial[0]["collated_masks"].shape == (8, 16) and serial[0]["n_masked_patches"].item() > 0


def test_two_ranks_together_equal_the_one_rank_batch():
    one = batches(loader_cfg(4), 2)
    ranks = [batches(loader_cfg(2), 2, rank=r, world_size=2) for r in range(2)]
    for g in range(2):
        for key, crops_per_image in (("collated_global_crops", 2), ("collated_local_crops", 2), ("collated_masks", 2)):
            for crop in range(crops_per_image):
                joined = torch.cat([ranks[r][g][key][crop * 2 : crop * 2 + 2] for r in range(2)])
                assert torch.equal(joined, one[g][key][crop * 4 : crop * 4 + 4]), key
        assert torch.cat([ranks[r][g]["positions"] for r in range(2)]).tolist() == list(range(4 * g, 4 * g + 4))
        assert ranks[0][g]["ids"] + ranks[1][g]["ids"] == one[g]["ids"]


def test_resume_at_an_iteration_equals_skipping_to_it():
    full = batches(loader_cfg(4), 4)
    resumed = batches(loader_cfg(4), 2, start_iter=2)
    for a, b in zip(full[2:], resumed):
        assert_same(a, b)


def test_batch_concurrent_datasets_receive_whole_batches():
    dataset = BatchedFields()
    got = batches(loader_cfg(4), 2, dataset=dataset)
    assert [len(call) for call in dataset.batched_calls] == [4, 4]
    assert [f"f{i}" for i in dataset.batched_calls[0]] == got[0]["ids"]
