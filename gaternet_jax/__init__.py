"""gaternet-jax: input-dependent channel gating (GaterNet) in JAX/Flax."""

__version__ = '0.1.0'
