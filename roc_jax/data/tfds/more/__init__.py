"""The ``more`` TFDS dataset (``tfds.builder('more')`` once this package is imported)."""

from roc_jax.data.tfds.more.more_dataset_builder import Builder

__all__ = ["Builder"]
