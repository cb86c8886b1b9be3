"""Classification metrics shared by k-NN, the linear probe and fine-tuning (definitions as in scikit-learn).

- accuracy: share of correct predictions;
- balanced accuracy: mean over the classes present in `y_true` of their recall (per-class accuracy), so a model
  that always answers the majority class of an imbalanced set scores 1 / n_classes, not the majority share;
- macro-F1: mean F1 over the classes that occur in `y_true` or in `y_pred` (a class never predicted scores 0);
- top-5: share of samples whose true class is among the 5 highest scores (reported only with more than 5 classes,
  where it is not trivially 1).
All values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    scores: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """accuracy, balanced_accuracy, macro_f1, per_class_accuracy {class: recall} (+ top5 from `scores` [N, C])."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or not len(y_true):
        raise ValueError(f"need two equal, non-empty label vectors, got {y_true.shape} and {y_pred.shape}")
    present = np.unique(y_true)
    correct = y_true == y_pred
    recall = {int(c): float(correct[y_true == c].mean()) for c in present}
    f1 = []
    for c in np.union1d(present, np.unique(y_pred)):
        true_pos = float(np.sum(correct & (y_true == c)))
        denominator = float(np.sum(y_true == c) + np.sum(y_pred == c))  # 2 TP + FP + FN
        f1.append(2.0 * true_pos / denominator)
    name = (lambda c: class_names[c]) if class_names is not None else str
    result = {
        "n": int(len(y_true)),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "macro_f1": float(np.mean(f1)),
        "per_class_accuracy": {name(c): r for c, r in recall.items()},
    }
    if scores is not None:
        scores = np.asarray(scores)
        if scores.shape != (len(y_true), scores.shape[-1]):
            raise ValueError(f"scores must be [N={len(y_true)}, n_classes], got {scores.shape}")
        if scores.shape[1] > 5:
            top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
            result["top5"] = float(np.mean((top5 == y_true[:, None]).any(axis=1)))
    return result
