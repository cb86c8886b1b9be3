"""Evaluation of learned features: extraction (in memory or to disk), k-NN, linear probe, fine-tuning, channel
consistency and replicate-retrieval mAP. One module per task; `dinocell eval <task>` runs each from the shell."""

from dinocell.eval.features import FeatureSet, export_features, extract, extract_features, load_features
from dinocell.eval.knn import knn_classify, knn_evaluate

__all__ = ["FeatureSet", "export_features", "extract", "extract_features", "knn_classify", "knn_evaluate",
           "load_features"]
