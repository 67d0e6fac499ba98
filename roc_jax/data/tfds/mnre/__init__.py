"""The ``mnre`` TFDS dataset (``tfds.builder('mnre')`` once this package is imported)."""

from roc_jax.data.tfds.mnre.mnre_dataset_builder import Builder

__all__ = ["Builder"]
