"""retrv_jax: Retrv-R1, a reasoning re-ranker for universal multimodal retrieval, in JAX."""

__version__ = "0.1.0"
