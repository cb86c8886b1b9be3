"""Evaluation of learned features: feature extraction and weighted k-NN classification."""

from dinocell.eval.features import extract_features
from dinocell.eval.knn import knn_classify

__all__ = ["extract_features", "knn_classify"]
