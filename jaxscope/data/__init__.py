"""Datasets that need no download (embedded or generated) and a batch iterator."""

from jaxscope.data.digits import Dataset, batches, load_digits

__all__ = ["Dataset", "batches", "load_digits"]
