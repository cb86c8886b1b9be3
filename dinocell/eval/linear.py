"""Linear probe: multinomial logistic regression on frozen features, its L2 penalty chosen on a validation split.

Protocol (the usual one of DINO-family papers, with a convex probe instead of SGD):
1. features are standardised with the mean and std of the set the probe is fitted on;
2. for each weight decay of the grid, a probe is fitted on the train rows and scored on the validation rows (the
   given validation set, or a stratified `val_fraction` of the train set);
3. the best weight decay (ties: the stronger penalty) is refitted on train + validation and scored on the test set.
The objective is mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not penalised), minimised to convergence
by full-batch L-BFGS in float64 on the features' device (float32 stalls a few 1e-4 short of the optimum); it equals
scikit-learn's LogisticRegression with C = 1 / (weight_decay * n_rows). Memory: 8 bytes per feature value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.eval.errors import EvalError
from dinocell.eval.metrics import classification_metrics

DEFAULT_WEIGHT_DECAYS = tuple(10.0**e for e in range(-6, 1))  # 1e-6 ... 1
SELECT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass
class LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ weight.T + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.mean) - self.mean) / self.std
        return (x @ self.weight.T + self.bias).float()


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, *, num_classes: int, weight_decay: float, max_iter: int = 1000
) -> LinearProbe:
    """Minimise mean cross-entropy + weight_decay / 2 * ||W||^2 on (x, y) with L-BFGS (on x's device)."""
    x = x.double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)
    xs, y = (x - mean) / std, y.long().to(x.device)
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight.T + bias, y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): `fraction` of each class (at least one row of every class with two or more)."""
    if not 0.0 < fraction < 1.0:
        raise EvalError(f"val_fraction={fraction} must be in (0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) > 1:
            val.extend(rows[: max(1, round(fraction * len(rows)))].tolist())
    val_rows = np.sort(np.array(val, np.int64))
    return np.setdiff1d(np.arange(len(labels)), val_rows), val_rows


def _predict(probe: LinearProbe, x: torch.Tensor) -> np.ndarray:
    return probe.logits(x).argmax(dim=1).cpu().numpy()


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    val_fraction: float = 0.2,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    select_by: str = "accuracy",
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """Choose the weight decay on validation, refit on train + validation, score the test set.

    Each of train/val/test is (features [N, D], labels [N]); all labels must lie in [0, num_classes). Returns
    {"weight_decay", "select_by", "validation": [{"weight_decay", metric...}], "test": metrics, "n_*"}.
    """
    if select_by not in SELECT_METRICS:
        raise EvalError(f"select_by={select_by!r} is not one of {', '.join(SELECT_METRICS)}")
    if not weight_decays or min(weight_decays) < 0:
        raise EvalError(f"weight_decays={list(weight_decays)} must be a non-empty list of values >= 0")
    for name, (x, y) in (("train", train), ("test", test), *((("validation", val),) if val is not None else ())):
        if x.ndim != 2 or y.shape != (x.shape[0],) or not len(y):
            raise EvalError(f"{name}: expected features [N, D] and labels [N] with N > 0, got {tuple(x.shape)} and "
                            f"{tuple(y.shape)}")
        if y.min() < 0 or y.max() >= num_classes:
            raise EvalError(f"{name} labels must lie in [0, {num_classes - 1}], found [{int(y.min())}, "
                            f"{int(y.max())}]; -1 marks an unlabelled sample, which a probe cannot use")
    if val is None:
        fit_rows, val_rows = stratified_split(train[1].cpu().numpy(), val_fraction, seed)
        fit, val = (train[0][fit_rows], train[1][fit_rows]), (train[0][val_rows], train[1][val_rows])
    else:
        fit = train
    y_val = val[1].cpu().numpy()
    scored = []
    for wd in sorted(weight_decays, reverse=True):  # strongest penalty first: it wins ties
        probe = fit_linear_probe(*fit, num_classes=num_classes, weight_decay=wd, max_iter=max_iter)
        metrics = classification_metrics(y_val, _predict(probe, val[0]))
        scored.append({"weight_decay": wd, **{m: metrics[m] for m in SELECT_METRICS}})
    best = max(scored, key=lambda s: s[select_by])  # max keeps the first of equal values
    both = (torch.cat([fit[0], val[0]]), torch.cat([fit[1], val[1]]))
    probe = fit_linear_probe(*both, num_classes=num_classes, weight_decay=best["weight_decay"], max_iter=max_iter)
    logits = probe.logits(test[0])
    test_metrics = classification_metrics(test[1].cpu().numpy(), logits.argmax(dim=1).cpu().numpy(),
                                          scores=logits.cpu().numpy(), class_names=class_names)
    return {
        "weight_decay": best["weight_decay"],
        "select_by": select_by,
        "validation": scored,
        "test": test_metrics,
        "n_train": len(fit[1]),
        "n_val": len(val[1]),
        "n_test": len(test[1]),
    }
