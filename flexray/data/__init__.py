"""Datasets (sklearn digits, offline .npz, torchvision) and their split across devices."""

from flexray.data.datasets import Dataset, cache_root, load_dataset, to_tensor
from flexray.data.partition import partition

__all__ = ["Dataset", "cache_root", "load_dataset", "partition", "to_tensor"]
