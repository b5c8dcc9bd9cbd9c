"""Base meta-training config: GHN-2 on CIFAR-10 as trained in the paper.

The recipe of the original (`experiments/train_ghn.py` of ppuda with
`-m 8 -n -v 50 --ln`): meta-batch of 8 DeepNets-1M training architectures
per image batch of 64, 300 epochs, Adam with learning rate 1e-3 and L2
weight decay 1e-5 (added to the gradient, as PyTorch's `Adam` does, not
decoupled as in AdamW), learning rate x0.1 after epochs 200 and 250,
gradient-norm clipping at 5. The other config files override this one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Return the GHN-2 CIFAR-10 config."""
  config = ml_collections.ConfigDict()
  config.seed = 1111

  # Images.
  config.dataset = "cifar10"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.batch_size = 64
  config.label_smoothing = 0.0

  # GHN: a preset of `ghn_jax.ghn` and field overrides of its GHNConfig.
  config.ghn = ml_collections.ConfigDict()
  config.ghn.preset = "ghn2"
  config.ghn.overrides = ml_collections.ConfigDict()

  # Architectures: DeepNets-1M split, drawn per step.
  config.arch = ml_collections.ConfigDict()
  config.arch.split = "train"
  config.arch.num_architectures = 1_000_000
  config.arch.meta_batch_size = 8
  # Widths: empty tuples draw them as the original's training loader does
  # (channels 32..128 and fc_dim 64..512 by network size).
  config.arch.channels = ()
  config.arch.fc_dims = ()
  # Architectures with more cells are skipped; 0 keeps all.
  config.arch.max_cells = 0
  config.arch.seed = 0

  # Optimisation.
  config.num_epochs = 300
  # Steps; -1 derives them from `num_epochs` and the dataset size.
  config.num_train_steps = -1
  config.learning_rate = 1e-3
  config.weight_decay = 1e-5
  config.lr_milestones = (2 / 3, 5 / 6)
  config.lr_decay = 0.1
  config.grad_clip = 5.0
  # Consecutive skipped updates (non-finite loss or gradient) before the
  # run stops.
  config.max_nonfinite_steps = 20

  # Local devices the meta-batch is split over (0: all).
  config.num_devices = 0

  # Bookkeeping.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 2

  # Evaluation at the end of training: accuracy of the predicted networks
  # against randomly initialised ones on held-out architectures.
  config.eval = ml_collections.ConfigDict()
  config.eval.split = "val"
  config.eval.num_architectures = 0
  config.eval.num_batches = 10
  config.eval.batch_size = 256
  return config
