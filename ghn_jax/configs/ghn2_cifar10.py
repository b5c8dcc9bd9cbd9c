"""GHN-2 on CIFAR-10: meta-batch 8, image batch 64, 300 epochs (the paper)."""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the GHN-2 CIFAR-10 config."""
  return default.get_config()
