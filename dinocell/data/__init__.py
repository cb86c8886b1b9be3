"""Data sources: the dataset base class, dataset strings and their registry, and the dataset families."""

from dinocell.data import datasets  # noqa: F401  (importing the families registers them)
from dinocell.data.dataset import Sample, SampleDataset
from dinocell.data.registry import list_datasets, make_dataset, parse_dataset_string, register_dataset

__all__ = ["Sample", "SampleDataset", "list_datasets", "make_dataset", "parse_dataset_string", "register_dataset"]
