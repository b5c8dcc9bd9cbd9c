"""Ablation on CIFAR-10: GHN-2 without layer norm of the node embeddings."""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the ablation config."""
  config = default.get_config()
  config.ghn.overrides.layernorm = False
  return config
