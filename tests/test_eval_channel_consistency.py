"""Channel consistency: a channel-blind model scores 1.0, a channel-sensitive one scores what a hand computation of
the views gives (with per-view normalisation), and `dinocell eval channel-consistency`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_data import tiny_config
from torch import nn

from dinocell.data import SampleDataset
from dinocell.eval.channel_consistency import ChannelViews, channel_consistency
from dinocell.eval.errors import EvalError


class Stains(SampleDataset):
    """Fields of 4 channels, 8 x 8: `shared` = one image per field times a per-channel gain (the stains differ only
    in brightness), else independent channels."""

    channel_names = ["DNA", "ER", "RNA", "Mito"]

    def __init__(self, n: int, shared: bool) -> None:
        self.n, self.shared = n, shared

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        if self.shared:
            image = torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None, None] * torch.rand(1, 8, 8, generator=g)
        else:
            image = torch.rand(4, 8, 8, generator=g)
        return {"image": image, "label": -1, "id": str(i)}


class ChannelBlind(nn.Module):
    """Sees only the sum over its input channels, pooled: the same field in any stain gives a parallel feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.sum(1, keepdim=True), 2).flatten(1)


def test_a_channel_blind_model_gives_cosine_one_and_perfect_retrieval():
    for in_chans in (4, 1):  # with in_chans == channels the `all` view is scored too
        result = channel_consistency(ChannelBlind(), Stains(12, shared=True), size=8, in_chans=in_chans,
                                     batch_size=5, num_workers=0, device="cpu", show_progress=False)
        views = ["DNA", "ER", "RNA", "Mito", *(["all"] if in_chans == 4 else [])]
        assert list(result["views"]) == views and result["n_fields"] == 12
        for scores in result["views"].values():
            assert scores["cosine_to_mean"] == pytest.approx(1.0, abs=1e-6)
            assert scores["retrieval_top1"] == 1.0
        assert result["chance_top1"] == pytest.approx(1 / 12)


def test_scores_equal_a_hand_computation_of_the_views_with_normalisation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 6))
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 1.0, 1.5, 2.0]
    dataset = Stains(10, shared=False)
    result = channel_consistency(model, dataset, size=8, in_chans=4, channel_mean=mean, channel_std=std,
                                 batch_size=3, num_workers=0, device="cpu", show_progress=False)

    def feature(view: np.ndarray) -> np.ndarray:  # view [k, 8, 8]: k = 1 is replicated to the 4 input channels
        x = np.broadcast_to(view, (4, 8, 8)).reshape(1, -1)
        with torch.no_grad():
            out = model(torch.from_numpy(np.array(x)).float().reshape(1, 4, 8, 8)).numpy()[0]
        return out / np.linalg.norm(out)

    images = [dataset[i]["image"].numpy() for i in range(10)]
    reference = np.stack([feature((im.mean(0, keepdims=True) - np.mean(mean)) / np.mean(std)) for im in images])
    views = {name: [feature((im[c : c + 1] - mean[c]) / std[c]) for im in images]
             for c, name in enumerate(Stains.channel_names)}
    views["all"] = [feature((im - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]) for im in images]
    for name, feats in views.items():
        feats = np.stack(feats)
        cosine = float(np.mean(np.sum(feats * reference, axis=1)))
        top1 = float(np.mean(np.argmax(feats @ reference.T, axis=1) == np.arange(10)))
        assert result["views"][name]["cosine_to_mean"] == pytest.approx(cosine, abs=1e-6)
        assert result["views"][name]["retrieval_top1"] == pytest.approx(top1)
    singles = [result["views"][n]["cosine_to_mean"] for n in Stains.channel_names]
    assert result["channel_average"]["cosine_to_mean"] == pytest.approx(np.mean(singles))
    assert max(singles) < 0.999  # independent stains: not a test that can only give 1


def test_views_refuse_mismatched_channel_layouts():
    with pytest.raises(EvalError, match="channel_mean has 3 values but the fields have 4 channels"):
        ChannelViews(8, 4, 4, [0.1] * 3, [1.0] * 3)
    views = ChannelViews(8, 1, 4, None, None)
    assert views.view_names() == ["mean", "channel_0", "channel_1", "channel_2", "channel_3"]
    with pytest.raises(EvalError, match="has 2 channels, the first field had 4"):
        views({"image": torch.zeros(2, 8, 8), "id": "odd"})


def test_channel_consistency_cli_on_synthetic_cell_painting(tmp_path, capsys):
    from dinocell.commands.eval_channel_consistency import main

    out = tmp_path / "channels"
    assert main(["--config-file", tiny_config(tmp_path), "--dataset",
                 "SyntheticCellPainting:size=6:image_size=32:cell_radius=6", "--num-workers", "0",
                 "--output-dir", str(out)]) == 0
    results = json.loads((out / "channel-consistency.json").read_text())
    assert list(results["views"]) == ["DNA", "ER", "RNA", "AGP", "Mito", "all"] and results["n_fields"] == 6
    assert all(-1.0 <= s["cosine_to_mean"] <= 1.0 for s in results["views"].values())
    assert (out / "channel-consistency.txt").read_text() in capsys.readouterr().out
