"""affect-jax: continuous facial-affect recognition in JAX/Flax (ABAW, Aff-Wild2)."""

__version__ = "0.1.0"
