"""Weighted k-NN and feature extraction: separable clusters, chance level, k and temperature effects, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinocell.data import SampleDataset
from dinocell.eval import extract_features, knn_classify


def _clusters(n_per_class: int, n_classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(n_classes, dim)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(feats, dim=-1), labels


def _unit(angle_deg: float) -> list[float]:
    return [math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))]


def test_separable_clusters_are_classified_perfectly():
    train_x, train_y = _clusters(50, 4, 16, noise=0.1, seed=0)
    test_x, test_y = _clusters(20, 4, 16, noise=0.1, seed=1)
    for k in (1, 10, 20):
        assert knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=0.07, num_classes=4) == 100.0


def test_random_labels_give_chance_level():
    g = torch.Generator().manual_seed(0)
    train_x = F.normalize(torch.randn(2000, 32, generator=g), dim=-1)
    test_x = F.normalize(torch.randn(1000, 32, generator=g), dim=-1)
    train_y, test_y = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    top1 = knn_classify(train_x, train_y, test_x, test_y, k=20, temperature=0.07, num_classes=4)
    assert 19.0 < top1 < 31.0  # chance = 25 %, binomial std over 1000 tests ~ 1.4 points


def test_k_and_temperature_decide_between_one_close_and_two_farther_neighbours():
    # query at 0 deg; class 0 has one neighbour at sim 1.0, class 1 two at sim cos(25.84 deg) = 0.9
    train_x = torch.tensor([_unit(0.0), _unit(25.84), _unit(-25.84), _unit(180.0)])
    train_y = torch.tensor([0, 1, 1, 0])
    query, truth = torch.tensor([_unit(0.0)]), torch.tensor([1])

    def top1(k: int, temperature: float) -> float:
        return knn_classify(train_x, train_y, query, truth, k=k, temperature=temperature, num_classes=2)

    assert top1(k=1, temperature=0.07) == 0.0  # only the closest (class 0) votes
    # k=3, T=0.07: class 0 weighs e^(1/0.07), class 1 2 e^(0.9/0.07): e^(0.1/0.07) = 4.2 > 2, class 0 still wins
    assert top1(k=3, temperature=0.07) == 0.0
    # k=3, T=1: e^1 = 2.72 < 2 e^0.9 = 4.92, the two farther neighbours outvote it
    assert top1(k=3, temperature=1.0) == 100.0


def test_chunking_does_not_change_the_result():
    train_x, train_y = _clusters(30, 3, 8, noise=0.8, seed=2)
    test_x, test_y = _clusters(30, 3, 8, noise=0.8, seed=3)
    results = {
        chunk: knn_classify(train_x, train_y, test_x, test_y, k=5, temperature=0.07, num_classes=3, chunk_size=chunk)
        for chunk in (1, 7, 4096)
    }
    assert len(set(results.values())) == 1 and 40.0 < results[1] < 100.0


def test_knn_rejects_bad_inputs():
    x, y = _clusters(2, 2, 4, noise=0.0, seed=0)
    with pytest.raises(ValueError, match="k=5 must be between 1 and the number of training samples \\(4\\)"):
        knn_classify(x, y, x, y, k=5, temperature=0.07, num_classes=2)
    with pytest.raises(ValueError, match="-1 marks an unlabelled sample"):
        knn_classify(x, torch.tensor([0, 1, -1, 0]), x, y, k=1, temperature=0.07, num_classes=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_classify(x, y, x, y, k=1, temperature=0.0, num_classes=2)


class _Samples(SampleDataset):
    """Records with 2 x 4 x 4 images whose first pixel encodes the index; counts batch fetches."""

    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        self.batch_fetches = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": index % 3, "id": str(index)}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        self.batch_fetches += 1
        return [self[i] for i in indices]


def test_extract_features_order_normalisation_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.Dropout(0.5))
    model.train()
    dataset = _Samples(11)

    def crop(sample: dict) -> dict:  # a deterministic eval view: the top-left 2 x 2 pixels, tiled back to 4 x 4
        return {**sample, "image": sample["image"][:, :2, :2].repeat(1, 2, 2)}

    feats, labels = extract_features(model, dataset, crop, batch_size=4, num_workers=0, device="cpu")
    assert feats.shape == (11, 6) and feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [i % 3 for i in range(11)]
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(11))
    model.eval()
    expected = F.normalize(model(torch.stack([crop(dataset[i])["image"] for i in range(11)])), dim=-1)
    torch.testing.assert_close(feats, expected)  # eval mode (no dropout) was used, dataset order kept
    assert dataset.batch_fetches == 3  # batches went through the dataset's own __getitems__


def test_extract_features_accepts_a_transform_that_returns_the_image():
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    as_record, _ = extract_features(model, _Samples(5), lambda s: {**s, "image": 2 * s["image"]}, batch_size=2,
                                    num_workers=0, device="cpu")
    as_image, _ = extract_features(model, _Samples(5), lambda s: 2 * s["image"], batch_size=2, num_workers=0,
                                   device="cpu")
    torch.testing.assert_close(as_record, as_image)


def test_extract_features_restores_training_mode_and_rejects_empty():
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    model.train()
    extract_features(model, _Samples(2), None, batch_size=2, num_workers=0, device="cpu")
    assert model.training
    with pytest.raises(ValueError, match="empty dataset"):
        extract_features(model, _Samples(0), None, batch_size=2, num_workers=0, device="cpu")


# ---------------------------------------------------------------------------- `dinocell knn`
TRAIN_SET = "SyntheticCellPainting:split=train:size=12:image_size=64:n_classes=3"
TEST_SET = "SyntheticCellPainting:split=test:size=8:image_size=64:n_classes=3"


def _tiny_run(tmp_path) -> tuple[str, str, nn.Module]:
    """A config like a run's config.yaml and an eval dump of a vit_test backbone, as training writes them.

    LayerScale 1.0: with the default 1e-5 a random ViT gives nearly the same cls token for every image, and
    float rounding (batch sizes differ) would decide the neighbours."""
    from dinocell.models import build_backbone

    config = tmp_path / "config.yaml"
    config.write_text(
        "student: {arch: vit_test, patch_size: 8, in_chans: 5, layerscale: 1.0}\n"
        "crops: {global_crops_size: 32, local_crops_size: 16}\n"
    )
    torch.manual_seed(123)
    backbone = build_backbone("vit_test", patch_size=8, in_chans=5, layerscale_init=1.0)
    dump = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, dump)
    return str(config), str(dump), backbone


@pytest.mark.slow
def test_dinocell_knn_scores_a_checkpoint_on_dataset_strings(tmp_path, capsys):
    """`dinocell knn` (= `dinocell eval knn`) with a run's config.yaml and its teacher dump, checked against the
    library functions run here on the same eval view."""
    import json

    from dinocell.cli import main as dinocell_main
    from dinocell.config import load_config
    from dinocell.data import make_dataset
    from dinocell.pipeline.loaders import build_eval_transform

    config, dump, backbone = _tiny_run(tmp_path)
    out = tmp_path / "knn"
    common = ["--config-file", config, "--train", TRAIN_SET, "--test", TEST_SET, "--num-workers", "0"]
    assert dinocell_main(["knn", *common, "--checkpoint", dump, "--k", "1", "3", "--batch-size", "5",
                          "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded eval dump" in printed and "12 reference / 8 query samples, 3 classes, T=0.07" in printed

    transform = build_eval_transform(load_config(config))
    (train_x, train_y), (test_x, test_y) = (
        extract_features(backbone, make_dataset(d), transform, batch_size=4, num_workers=0, device="cpu")
        for d in (TRAIN_SET, TEST_SET)
    )
    results = json.loads((out / "knn.json").read_text())
    for k in (1, 3):
        top1 = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=0.07, num_classes=3)
        assert 100 * results["k"][str(k)]["accuracy"] == pytest.approx(top1)


def test_dinocell_knn_help_and_argument_errors(tmp_path, capsys):
    from dinocell.cli import main as dinocell_main

    with pytest.raises(SystemExit) as exit_info:
        dinocell_main(["knn", "--help"])
    assert exit_info.value.code == 0 and "usage: dinocell eval knn" in capsys.readouterr().out
    out = ["--output-dir", str(tmp_path / "o")]
    assert dinocell_main(["knn", "--arch", "vit_smal", "--train", TRAIN_SET, "--test", TEST_SET, *out]) == 2
    assert "closest 'vit_small'" in capsys.readouterr().err  # a config error names the closest valid value
