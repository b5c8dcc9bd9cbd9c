"""CPU-sized default: a GHN-2 meta-trained on Fashion-MNIST on a CPU.

Its 300 steps took 17 min on an otherwise idle 2-core machine (2026-12-04).
Small DeepNets-1M training architectures (at most 4 cells, 16
channels, one classifier width), meta-batch 4, image batch 32. Few distinct
op shapes occur in this space, so new per-signature compilations become
rare after the first steps (apart from recompiling after compiled programs
are dropped near the memory-mapping limit). Fashion-MNIST is read from the
Debian package `dataset-fashion-mnist` (no download), padded to 32x32x3.
"""

import ml_collections

from ghn_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Return the CPU-sized meta-training config."""
  config = default.get_config()
  config.dataset = "fashion_mnist"
  config.batch_size = 32
  config.arch.num_architectures = 10_000
  config.arch.meta_batch_size = 4
  config.arch.channels = (16,)
  config.arch.fc_dims = (32,)
  config.arch.max_cells = 4
  config.num_train_steps = 300
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.eval.num_architectures = 10
  config.eval.num_batches = 16
  # The training batch size, so evaluation reuses the compiled op shapes.
  config.eval.batch_size = config.batch_size
  return config
