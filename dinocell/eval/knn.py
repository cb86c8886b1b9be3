"""Weighted k-NN classification of features, as in DINO: a training-free measure of feature quality.

Each test feature votes with its k most cosine-similar training features, neighbour j weighing exp(sim_j / T)
for its class; the class with the largest total wins (top-1). Top-5 counts a query whose true class is among the 5
largest totals and got votes at all (with k < 5 some of the "top 5" would be classes nobody voted for). Several k
are scored from one neighbour search (the k_max nearest, sorted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dinocell.eval.errors import EvalError
from dinocell.eval.metrics import classification_metrics
from dinocell.eval.report import format_table, percent


def _check(train_feats, train_labels, test_feats, test_labels, ks, temperature, num_classes) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise EvalError(
            f"features must be [N, D] with the same D, got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise EvalError(
            f"labels must be [N] matching the features: train {tuple(train_labels.shape)} for "
            f"{train_feats.shape[0]} rows, test {tuple(test_labels.shape)} for {test_feats.shape[0]} rows"
        )
    for k in ks:
        if not 1 <= k <= train_feats.shape[0]:
            raise EvalError(f"k={k} must be between 1 and the number of training samples ({train_feats.shape[0]})")
    if temperature <= 0:
        raise EvalError(f"temperature must be > 0, got {temperature}; DINO uses 0.07")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise EvalError(
                f"{name} labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), found "
                f"[{int(labels.min())}, {int(labels.max())}]; -1 marks an unlabelled sample, which k-NN cannot use"
            )
    if test_feats.shape[0] == 0:
        raise EvalError("k-NN got no test samples")


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    chunk_size: int = 1024,
) -> dict[int, dict]:
    """k -> metrics (accuracy = top-1, top5 with more than 5 classes, balanced_accuracy, macro_f1,
    per_class_accuracy; fractions in [0, 1]). Features are L2-normalised here (dot product = cosine); test rows go
    `chunk_size` at a time to bound the memory used."""
    ks = sorted(set(int(k) for k in ks))
    _check(train_feats, train_labels, test_feats, test_labels, ks, temperature, num_classes)
    train_feats = F.normalize(train_feats.float(), dim=-1)
    train_labels = train_labels.long().to(train_feats.device)
    predictions = {k: [] for k in ks}
    top5_hits = {k: [] for k in ks}
    for start in range(0, test_feats.shape[0], chunk_size):
        queries = F.normalize(test_feats[start : start + chunk_size].float().to(train_feats.device), dim=-1)
        truth = test_labels[start : start + chunk_size].long().to(train_feats.device)
        similarity, neighbours = (queries @ train_feats.t()).topk(ks[-1], dim=1)  # [n, k_max], most similar first
        weights, neighbour_labels = (similarity / temperature).exp(), train_labels[neighbours]
        for k in ks:
            votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            predictions[k].append(votes.argmax(dim=1).cpu())
            top5 = votes.topk(min(5, num_classes), dim=1).indices  # a class without votes never counts as a hit
            hit = (top5 == truth[:, None]).any(dim=1) & (votes.gather(1, truth[:, None])[:, 0] > 0)
            top5_hits[k].append(hit.cpu())
    y_true = test_labels.long().cpu().numpy()
    results = {}
    for k in ks:
        metrics = classification_metrics(y_true, torch.cat(predictions[k]).numpy(), class_names=class_names)
        if num_classes > 5:
            metrics["top5"] = float(torch.cat(top5_hits[k]).float().mean())
        results[k] = metrics
    return results


def knn_table(results: dict) -> str:
    """The k-NN results ({"k": {k: metrics}}) as text: one row per k, then per-class accuracy (knn.txt)."""
    rows = [[k, percent(m["accuracy"]), percent(m.get("top5")), percent(m["balanced_accuracy"]),
             percent(m["macro_f1"])] for k, m in results["k"].items()]
    text = format_table(["k", "top-1 %", "top-5 %", "balanced acc %", "macro-F1 %"], rows)
    first = next(iter(results["k"].values()))
    per_class = [[c, *(percent(m["per_class_accuracy"][c]) for m in results["k"].values())]
                 for c in first["per_class_accuracy"]]
    headers = ["class", *(f"k={k} acc %" for k in results["k"])]
    return text + "\n\nper-class accuracy (recall)\n" + format_table(headers, per_class)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    *,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of weighted k-NN with one k (what the trainer reports at start and end)."""
    results = knn_evaluate(train_feats, train_labels, test_feats, test_labels, ks=[k], temperature=temperature,
                           num_classes=num_classes, chunk_size=chunk_size)
    return 100.0 * results[k]["accuracy"]
