"""ghn_jax: Graph HyperNetworks (GHN-2) in JAX and Flax."""

__version__ = "0.1.0"
