"""Ablation on CIFAR-10: GHN-2 trained with one architecture per step."""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the ablation config."""
  config = default.get_config()
  config.arch.meta_batch_size = 1
  return config
