"""Ablation on CIFAR-10: GHN-1 (no virtual edges, layer norm, weight norm)."""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the ablation config."""
  config = default.get_config()
  config.ghn.preset = "ghn1"
  return config
