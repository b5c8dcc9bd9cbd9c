"""Ablation on CIFAR-10: GHN-2 without virtual edges."""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the ablation config."""
  config = default.get_config()
  config.ghn.overrides.virtual_edges = False
  return config
