"""Data: dataset strings and registry, dataset families, and (from the crop pipeline) transforms and loaders."""

from dinocell.data import datasets  # noqa: F401  (importing the families registers them)
from dinocell.data.registry import list_datasets, make_dataset, parse_dataset_string, register_dataset

__all__ = ["list_datasets", "make_dataset", "parse_dataset_string", "register_dataset"]
