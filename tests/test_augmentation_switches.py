"""Every augmentation switch, through the whole crop pipeline (config -> MultiCropTransform): with the switch on its
effect shows in about the configured share of crops, with it off never. The op functions themselves are tested in
test_transforms.py; these tests catch a transform that ignores (or misreads) its configuration.

Each test runs on both paths: the CPU reference (the workers finish every crop) and the device path
(crops.gpu_augmentations: the workers cut crops and draw parameters, collate stacks them, SSLBatch.finish_crops applies
the rest batched, here on the CPU)."""

from __future__ import annotations

import pytest
import torch

from dinocell.config import load_config
from dinocell.pipeline.collate import collate_ssl_batch
from dinocell.pipeline.loaders import build_ssl_transform

N_POSITIONS = 60  # x (2 global + 4 local) crops = 360 crops per configuration
GROUPS = ("global1", "global2", "local")
QUIET = [  # no op fires unless a test turns it on
    "crops.horizontal_flips=false", "crops.vertical_flips=false", "crops.rotate90=false",
    "crops.intensity_aug_probability=0.0",
    "crops.blur_probability={global1: 0.0, global2: 0.0, local: 0.0}",
    "crops.solarization_probability={global1: 0.0, global2: 0.0, local: 0.0}",
    "crops.noise_probability={global1: 0.0, global2: 0.0, local: 0.0}",
]  # fmt: skip


def ramp(channels: int = 1, size: int = 64) -> dict:
    """x-ramp + 2 x y-ramp, in [0, 1]: a crop's gradient tells its orientation (flips change signs, a quarter turn
    swaps the axes)."""
    axis = torch.linspace(0.0, 1.0, size)
    image = (axis.view(1, -1) + 2 * axis.view(-1, 1)) / 3
    return {"image": image.expand(channels, size, size).clone(), "label": 0, "id": "ramp"}


PATHS = ("cpu", "device")


def crops_by_group(overrides: list[str], sample: dict | None = None, channels: int = 1, path: str = "cpu"
                   ) -> dict[str, list]:
    cfg = load_config(overrides=[
        "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=4",
        "crops.global_crops_scale=[0.3,1.0]", "crops.local_crops_scale=[0.1,0.3]", f"student.in_chans={channels}",
        "student.patch_size=8", *QUIET, *overrides, f"crops.gpu_augmentations={str(path == 'device').lower()}",
    ])  # fmt: skip
    transform, sample = build_ssl_transform(cfg), sample or ramp(channels)
    items = [(transform(sample, position), position) for position in range(N_POSITIONS)]
    if path == "device":  # one batch of all positions, finished as the training step does
        batch = collate_ssl_batch(items, lambda p: torch.zeros(2 * len(p), 0, dtype=torch.bool), 16).finish_crops()
        n = N_POSITIONS
        return {"global1": list(batch.global_crops[:n]), "global2": list(batch.global_crops[n:]),
                "local": [batch.local_crops[c * n + i] for i in range(n) for c in range(4)]}  # position-major
    out: dict[str, list] = {g: [] for g in GROUPS}
    for crops, _ in items:
        out["global1"].append(crops["global_crops"][0])
        out["global2"].append(crops["global_crops"][1])
        out["local"] += crops["local_crops"]
    return out


def orientation(crop: torch.Tensor) -> tuple[int, int, bool]:
    """(sign of the mean x-gradient, sign of the mean y-gradient, whether the y-gradient is the larger one)."""
    gx = float((crop[..., :, 1:] - crop[..., :, :-1]).mean())
    gy = float((crop[..., 1:, :] - crop[..., :-1, :]).mean())
    return int(gx > 0) - int(gx < 0), int(gy > 0) - int(gy < 0), abs(gy) > abs(gx)


def share(crops: list[torch.Tensor], seen) -> float:
    return sum(bool(seen(c)) for c in crops) / len(crops)


UPRIGHT = (1, 1, True)  # the field's own orientation


@pytest.mark.parametrize(
    ("switch", "effect", "expected"),
    [
        ("crops.horizontal_flips", lambda o: o == (-1, 1, True), 0.5),
        ("crops.vertical_flips", lambda o: o == (1, -1, True), 0.5),
        # 1, 2 or 3 of 4 quarter turns; a half turn flips both signs, a quarter turn puts the stronger ramp on x
        ("crops.rotate90", lambda o: o in ((-1, -1, True), (1, -1, False), (-1, 1, False)), 0.75),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_geometric_switches(switch, effect, expected, path):
    on = [c for crops in crops_by_group([f"{switch}=true"], path=path).values() for c in crops]
    off = [c for crops in crops_by_group([f"{switch}=false"], path=path).values() for c in crops]
    assert all(orientation(c) == UPRIGHT for c in off)  # off: every crop keeps the field's orientation
    assert abs(share(on, lambda c: effect(orientation(c))) - expected) < 0.1
    assert all(effect(orientation(c)) or orientation(c) == UPRIGHT for c in on)  # no other transformation


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("op", "settings"),
    [
        ("blur", ["crops.blur_sigma=[1.0,2.0]"]),
        ("solarization", ["crops.solarization_threshold=0.5"]),
        ("noise", ["crops.noise_std=[0.05,0.1]"]),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_per_group_photometric_probabilities(op, settings, path):
    """Each group gets its own chance (0.0, 0.5 and 1.0 here), compared crop by crop with the op switched off: every
    random draw happens whether or not an op fires, so the two runs cut the same boxes."""
    chances = {"global1": 0.0, "global2": 0.5, "local": 1.0}
    key = f"crops.{op}_probability={{global1: 0.0, global2: 0.5, local: 1.0}}"
    sample = ramp(1, 96)
    sample["image"] = sample["image"] + 0.3 * torch.rand(1, 96, 96, generator=torch.Generator().manual_seed(0))
    on, off = crops_by_group([key, *settings], sample, path=path), crops_by_group(settings, sample, path=path)
    for group, chance in chances.items():
        changed = share(list(zip(on[group], off[group])), lambda pair: _changed(*pair))
        assert abs(changed - chance) < 0.15, (op, group, changed)


@pytest.mark.parametrize("path", PATHS)
def test_intensity_probability_and_the_photometric_master_switch(path):
    half = crops_by_group(["crops.intensity_aug_probability=0.5"], path=path)
    never = crops_by_group([], path=path)
    pairs = [(a, b) for g in GROUPS for a, b in zip(half[g], never[g])]
    assert abs(share(pairs, lambda p: _changed(*p)) - 0.5) < 0.1
    every_op = ["crops.intensity_aug_probability=1.0", "crops.noise_std=[0.05,0.1]",
                *(f"crops.{op}_probability={{global1: 1.0, global2: 1.0, local: 1.0}}"
                  for op in ("blur", "solarization", "noise"))]  # fmt: skip
    master_off = crops_by_group([*every_op, "crops.photometric_aug=false"], path=path)
    geometry_only = crops_by_group(["crops.photometric_aug=false"], path=path)  # the same stream: no photometric draws
    assert all(torch.equal(a, b) for g in GROUPS for a, b in zip(master_off[g], geometry_only[g]))  # nothing fires
    master_on = crops_by_group(every_op, path=path)
    assert all(_changed(a, b) for g in GROUPS for a, b in zip(master_on[g], never[g]))


@pytest.mark.parametrize("path", PATHS)
def test_channel_views_per_group(path):
    """`single` picks different channels across crops; `mean` averages; `all` keeps them; each group on its own."""
    channels = torch.arange(1.0, 6.0).view(5, 1, 1).expand(5, 64, 64).clone()  # channel c is the constant c + 1
    sample = {"image": channels, "label": 0, "id": "stains"}
    out = crops_by_group(["crops.channel_views={global1: all, global2: mean, local: single}"], sample, channels=5,
                         path=path)
    assert all(torch.allclose(c[:, 0, 0], torch.arange(1.0, 6.0)) for c in out["global1"])
    assert all(torch.allclose(c, torch.full_like(c, 3.0)) for c in out["global2"])
    picked = {round(float(c[0, 0, 0])) for c in out["local"]}
    assert picked == {1, 2, 3, 4, 5} and all(torch.equal(c[0], c[4]) for c in out["local"])
