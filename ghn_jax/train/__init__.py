"""Meta-training of GHNs: loop, executor, checkpoints and metrics."""

from ghn_jax.train.executor import (
  MetaBatch,
  meta_value_and_grad,
  prepare_meta_batch,
)
from ghn_jax.train.loop import TrainState, train_and_evaluate

__all__ = [
  "MetaBatch",
  "TrainState",
  "meta_value_and_grad",
  "prepare_meta_batch",
  "train_and_evaluate",
]
