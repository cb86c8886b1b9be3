"""Linear probe: separable features, the fit against scikit-learn's LogisticRegression, metrics against sklearn,
the penalty chosen on validation, and `dinocell eval linear`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_data import Tiles, tiny_model
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from dinocell.eval.errors import EvalError
from dinocell.eval.features import export_features
from dinocell.eval.linear import fit_linear_probe, linear_probe, stratified_split


def separable(seed: int, n: int, num_classes: int = 6, dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes in disjoint slabs along a random direction, plus nuisance dimensions: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(7))
    direction /= direction.norm()
    x = 3.0 * torch.randn(n, dim, generator=g)
    x -= (x @ direction)[:, None] * direction  # nuisance orthogonal to the direction
    position = labels.float() * 2.0 + torch.rand(n, generator=g) * 1.2  # slab c: [2c, 2c + 1.2]
    return x + position[:, None] * direction, labels


def test_linearly_separable_features_reach_at_least_99_percent():
    result = linear_probe(separable(0, 600), separable(1, 300), num_classes=6, weight_decays=[1e-4, 1e-2, 1.0])
    assert result["test"]["accuracy"] >= 0.99 and result["test"]["balanced_accuracy"] >= 0.99
    assert result["n_train"] + result["n_val"] == 600 and result["n_test"] == 300
    assert len(result["validation"]) == 3 and "top5" in result["test"]


def test_probe_equals_sklearn_logistic_regression_with_the_matching_penalty():
    x, y = separable(2, 200, num_classes=3)
    x = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # overlapping classes
    probe = fit_linear_probe(x, y, num_classes=3, weight_decay=0.05)
    x64 = x.double()
    standardised = ((x64 - x64.mean(0)) / x64.std(0, unbiased=False)).numpy()
    reference = LogisticRegression(C=1.0 / (0.05 * len(y)), tol=1e-10, max_iter=10000).fit(standardised, y.numpy())
    np.testing.assert_allclose(torch.softmax(probe.logits(x).double(), 1).numpy(),
                               reference.predict_proba(standardised), atol=1e-5)
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_, atol=1e-4)


def test_the_penalty_is_chosen_on_validation_ties_to_the_stronger_one():
    g = torch.Generator().manual_seed(4)
    noisy = [(x + 2.5 * torch.randn(x.shape, generator=g), y) for x, y in
             (separable(5, 240, num_classes=4), separable(6, 120, num_classes=4), separable(8, 120, num_classes=4))]
    result = linear_probe(noisy[0], noisy[1], val=noisy[2], num_classes=4, weight_decays=[1e-4, 1e-2, 1.0, 100.0],
                          select_by="macro_f1")
    scored = result["validation"]
    assert [v["weight_decay"] for v in scored] == [100.0, 1.0, 1e-2, 1e-4]  # strongest first: it wins ties
    best = max(scored, key=lambda v: v["macro_f1"])  # max keeps the first of equal values
    assert result["weight_decay"] == best["weight_decay"] and result["n_val"] == 120 and result["n_train"] == 240
    assert scored[0]["accuracy"] < best["accuracy"]  # 100 shrinks the probe towards chance


def test_stratified_split_holds_out_the_fraction_of_every_class():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 1)
    fit, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(71))
    assert np.bincount(labels[val], minlength=3).tolist() == [10, 4, 0]  # a single-sample class stays in fit
    with pytest.raises(EvalError, match="val_fraction=1.5 must be in \\(0, 1\\)"):
        stratified_split(labels, 1.5, seed=0)


def test_linear_rejects_unlabelled_rows_and_bad_choices():
    x, y = separable(0, 20, num_classes=2)
    with pytest.raises(EvalError, match="-1 marks an unlabelled sample"):
        linear_probe((x, torch.full_like(y, -1)), (x, y), num_classes=2)
    with pytest.raises(EvalError, match="select_by='top1' is not one of accuracy, balanced_accuracy, macro_f1"):
        linear_probe((x, y), (x, y), num_classes=2, select_by="top1")


def test_linear_cli_reports_sklearn_metrics_of_its_predictions(tmp_path, capsys):
    from dinocell.commands.eval_linear import main

    model = tiny_model()
    for split, n, offset in (("train", 60, 0), ("test", 30, 1000)):
        export_features(model, Tiles(n=n, bad=(), offset=offset), None, tmp_path / split, settings={},
                        kinds=("cls", "patch_mean"), batch_size=16, num_workers=0, device="cpu", show_progress=False)
    out = tmp_path / "linear"
    assert main(["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--features",
                 "cls+patch_mean", "--weight-decays", "0.01", "1", "--output-dir", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "linear.json").read_text())
    assert results["features"] == "cls+patch_mean" and results["n_test"] == 30 and results["num_classes"] == 3
    assert [v["weight_decay"] for v in results["validation"]] == [1.0, 0.01]
    assert "per-class test accuracy" in capsys.readouterr().out


def test_test_metrics_equal_sklearn_on_the_probe_predictions():
    train, test = separable(9, 200, num_classes=5), separable(10, 100, num_classes=5)
    noisy = [(x + 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i)), y)
             for i, (x, y) in enumerate((train, test))]
    result = linear_probe(noisy[0], noisy[1], num_classes=5, weight_decays=[0.01])
    fit_rows, val_rows = stratified_split(noisy[0][1].numpy(), 0.2, seed=0)
    order = np.concatenate([fit_rows, val_rows])  # the refit sees fit rows then validation rows
    probe = fit_linear_probe(noisy[0][0][order], noisy[0][1][order], num_classes=5, weight_decay=0.01)
    pred = probe.logits(noisy[1][0]).argmax(1).numpy()
    y = noisy[1][1].numpy()
    assert result["test"]["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert result["test"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert result["test"]["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert 0.3 < result["test"]["accuracy"] < 0.98  # noisy enough for the metrics to differ
