"""Datasets (registry) and client partitions."""

from flsec.data.datasets import DATASETS, ImageDataset, load_dataset
from flsec.data.partition import dirichlet_partition, iid_partition, make_partition

__all__ = ["DATASETS", "ImageDataset", "dirichlet_partition", "iid_partition", "load_dataset", "make_partition"]
