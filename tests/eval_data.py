"""Small data and models shared by the evaluation tests."""

from __future__ import annotations

import torch

from dinocell.data import SampleDataset
from dinocell.models import build_backbone


class Tiles(SampleDataset):
    """n seeded 3 x 8 x 8 images (seed i + offset), label i % 3, plate/well meta; the samples in `bad` stand in for a
    bad one (as a dataset's tracker marks them)."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int = 11, bad: tuple[int, ...] = (5,), offset: int = 0) -> None:
        self.n, self.bad, self.offset = n, bad, offset

    def __len__(self) -> int:
        return self.n

    def _good(self, i: int) -> dict:
        image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i + self.offset))
        return {"image": image, "label": i % 3, "id": f"s{i}", "meta": {"plate": "P1", "well": f"A{i + 1:02d}"}}

    def __getitem__(self, i: int) -> dict:
        if i not in self.bad:
            return self._good(i)
        sample = self._good((i + 1) % self.n)
        sample["meta"] = {**sample["meta"], "substituted_for": f"s{i}", "bad_reason": "missing"}
        return sample


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_test", patch_size=4, in_chans=3, layerscale_init=0.1)


def tiny_config(tmp_path) -> str:
    config = tmp_path / "config.yaml"
    config.write_text("student: {arch: vit_test, patch_size: 8, in_chans: 5}\n"
                      "crops: {global_crops_size: 32, local_crops_size: 16}\n")
    return str(config)
