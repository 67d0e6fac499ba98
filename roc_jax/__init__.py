"""roc_jax: ROC (Retrieval over Classification) for multimodal relation extraction in JAX/Flax."""

__version__ = "0.1.0"
