"""GHN-2 on ImageNet, as the original's `train_ghn.py -d imagenet`.

Differences from CIFAR-10 in the original: image batch 256, label smoothing
0.1, 224x224 inputs, 16x16 maximum predicted kernel, 1000 classes.
"""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the GHN-2 ImageNet config."""
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.batch_size = 256
  config.label_smoothing = 0.1
  config.ghn.preset = "ghn2_imagenet"
  config.eval.batch_size = 64
  return config
