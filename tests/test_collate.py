"""Collate contract (crop-major stacking, mask indices and weights) and the loader stream: independent of the number
of workers, two ranks = one rank, resume = skip, batch-concurrent datasets get whole batches."""

import dataclasses
import itertools

import torch

from dinocell.config import load_config
from dinocell.data import SampleDataset
from dinocell.pipeline.batch import SSLBatch
from dinocell.pipeline.collate import collate_ssl_batch
from dinocell.pipeline.loaders import build_ssl_loader_from_config, build_ssl_transform


def fake_item(index: int, n_local: int) -> tuple[dict, int]:
    """Crops filled with 100*index + crop number, so their place in the batch can be read back; position 40+index."""
    crops = {
        "global_crops": [torch.full((2, 8, 8), 100.0 * index + c) for c in range(2)],
        "local_crops": [torch.full((2, 4, 4), 100.0 * index + 10 + c) for c in range(n_local)],
    }
    return crops, 40 + index


def fixed_masks(positions: list[int]) -> torch.Tensor:
    assert positions == list(range(40, 40 + len(positions)))  # the planner gets the samples' stream positions
    masks = torch.zeros(2 * len(positions), 4, dtype=torch.bool)
    masks[0, :3] = True  # crop 1 of image 0: 3 patches
    masks[len(positions) + 1, 1] = True  # crop 2 of image 1: 1 patch
    return masks


def test_collate_stacks_crop_major_with_mask_indices_and_weights():
    batch = collate_ssl_batch([fake_item(i, 3) for i in range(2)], fixed_masks, local_crops_size=4)
    assert isinstance(batch, SSLBatch) and (batch.n_global_crops, batch.n_local_crops, batch.batch_size) == (2, 3, 2)
    assert batch.global_crops.shape == (4, 2, 8, 8)
    assert batch.global_crops[:, 0, 0, 0].tolist() == [0.0, 100.0, 1.0, 101.0]
    assert batch.local_crops.shape == (6, 2, 4, 4)
    assert batch.local_crops[:, 0, 0, 0].tolist() == [10.0, 110.0, 11.0, 111.0, 12.0, 112.0]
    assert batch.mask_indices.tolist() == [0, 1, 2, 3 * 4 + 1]
    torch.testing.assert_close(batch.mask_weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert {f.name for f in dataclasses.fields(batch)} == {
        "global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "n_global_crops", "n_local_crops",
        "device_augmentation",
    }  # exactly what the meta-arch reads, and the crops' pending work (crops.gpu_augmentations), done before it reads
    assert batch.device_augmentation is None and batch.finish_crops() is batch


def test_collate_without_local_crops_gives_an_empty_tensor_of_the_right_shape():
    batch = collate_ssl_batch([fake_item(i, 0) for i in range(3)], fixed_masks, local_crops_size=4)
    assert batch.local_crops.shape == (0, 2, 4, 4) and batch.n_local_crops == 0


def test_batch_moves_and_pins_every_tensor():
    batch = collate_ssl_batch([fake_item(i, 1) for i in range(2)], fixed_masks, local_crops_size=4)
    moved = batch.to(torch.device("meta"))
    assert all(getattr(moved, f).device.type == "meta" for f in ("global_crops", "local_crops", "masks",
                                                                  "mask_indices", "mask_weights"))
    assert moved.n_global_crops == 2 and batch.global_crops.device.type == "cpu"  # the original is untouched


class TinyFields(SampleDataset):
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
    return load_config(overrides=[
        f"train.batch_size_per_gpu={batch}",
        f"train.num_workers={workers}",
        "student.in_chans=3",
        "student.patch_size=8",
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        "crops.local_crops_number=2",
    ])


def batches(cfg, n: int, *, rank: int = 0, world_size: int = 1, start_iter: int = 0, dataset=None) -> list[SSLBatch]:
    loader = build_ssl_loader_from_config(
        cfg, dataset or TinyFields(), rank=rank, world_size=world_size, start_iter=start_iter
    )
    return list(itertools.islice(iter(loader), n))


def assert_same(a: SSLBatch, b: SSLBatch) -> None:
    for field in dataclasses.fields(a):
        value, other = getattr(a, field.name), getattr(b, field.name)
        assert (torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other), field.name


def expected_global_crops(cfg, positions: list[int]) -> torch.Tensor:
    """The crop-major global crops of the stream positions, by the transform alone (sampler shuffles: find indices)."""
    transform, dataset = build_ssl_transform(cfg), TinyFields()
    sampler_order = build_ssl_loader_from_config(cfg, dataset, rank=0, world_size=1, start_iter=0).sampler
    index_of = dict((p, i) for i, p in itertools.islice(iter(sampler_order), max(positions) + 1))
    crops = [transform(dataset[index_of[p]], p)["global_crops"] for p in positions]
    return torch.stack([c[j] for j in range(2) for c in crops])


def test_batches_do_not_depend_on_the_number_of_workers():
    serial = batches(loader_cfg(4, workers=0), 3)
    parallel = batches(loader_cfg(4, workers=2), 3)
    for a, b in zip(serial, parallel):
        assert_same(a, b)
    assert serial[0].masks.shape == (8, 16) and serial[0].mask_indices.numel() > 0
    assert torch.equal(serial[1].global_crops, expected_global_crops(loader_cfg(4), [4, 5, 6, 7]))


def test_two_ranks_together_equal_the_one_rank_batch():
    one = batches(loader_cfg(4), 2)
    ranks = [batches(loader_cfg(2), 2, rank=r, world_size=2) for r in range(2)]
    for g in range(2):
        for key in ("global_crops", "local_crops", "masks"):
            for crop in range(2):
                joined = torch.cat([getattr(ranks[r][g], key)[crop * 2 : crop * 2 + 2] for r in range(2)])
                assert torch.equal(joined, getattr(one[g], key)[crop * 4 : crop * 4 + 4]), key


def test_resume_at_an_iteration_equals_skipping_to_it():
    full = batches(loader_cfg(4), 4)
    resumed = batches(loader_cfg(4), 2, start_iter=2)
    for a, b in zip(full[2:], resumed):
        assert_same(a, b)


def test_batch_concurrent_datasets_receive_whole_batches():
    dataset = BatchedFields()
    got = batches(loader_cfg(4), 2, dataset=dataset)
    assert [len(call) for call in dataset.batched_calls] == [4, 4]
    assert_same(got[1], batches(loader_cfg(4), 2)[1])  # the same stream as one-by-one fetching
