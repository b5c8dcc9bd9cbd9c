"""Ablation on CIFAR-10: MLP-GHN baseline (per-node MLP, no message passing)."""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the ablation config."""
  config = default.get_config()
  config.ghn.preset = "mlp_ghn"
  return config
