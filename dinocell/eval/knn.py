"""Weighted k-NN classification of features, as in DINO: a training-free measure of feature quality.

Each test feature votes with its k most cosine-similar training features, neighbour j weighing exp(sim_j / T)
for its class; the class with the largest total wins. Features are expected L2-normalised (dot product = cosine).
"""

from __future__ import annotations

import torch


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
    """Top-1 accuracy (percent) of weighted k-NN; test rows go `chunk_size` at a time to bound the memory used."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise ValueError(
            f"labels must be [N] matching the features: train {tuple(train_labels.shape)} for "
            f"{train_feats.shape[0]} rows, test {tuple(test_labels.shape)} for {test_feats.shape[0]} rows"
        )
    if not 1 <= k <= train_feats.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of training samples ({train_feats.shape[0]})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; DINO uses 0.07")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), found "
                f"[{int(labels.min())}, {int(labels.max())}]; -1 marks an unlabelled sample, which k-NN cannot use"
            )
    if test_feats.shape[0] == 0:
        raise ValueError("knn_classify got no test samples")
    train_feats = train_feats.float()
    train_labels = train_labels.long()
    correct = 0
    for start in range(0, test_feats.shape[0], chunk_size):
        queries = test_feats[start : start + chunk_size].float()
        similarity, neighbours = (queries @ train_feats.t()).topk(k, dim=1)  # [n, k]
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk_size].long()).sum())
    return 100.0 * correct / test_feats.shape[0]
