"""Running batch-norm statistics for the networks of the evaluation.

The DeepNets-1M networks of this package normalise with the statistics of
the current batch (`nn_ops.batch_norm`, PyTorch's BatchNorm2d in training
mode without running statistics), as the GHN-2 evaluation does. To score
such a network with running statistics instead, this module traces it with
`nn_ops.batch_norm` temporarily replaced: once by a version that records
each call's batch mean and variance, and once by a version that normalises
with given statistics. Calls are matched by their order in the trace, which
is fixed for a given network. Models built with `flax.linen.BatchNorm` (the
model zoo) keep running statistics in a 'batch_stats' collection instead;
`make_flax_batch_norm_fns` handles them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ghn_jax import nn_ops

Params = Any
# (mean, variance) per batch-norm call, in call order.
BatchStats = list[tuple[jax.Array, jax.Array]]


@contextlib.contextmanager
def _replaced_batch_norm(function: Callable) -> Iterator[None]:
  """Make `nn_ops.batch_norm` call `function` inside the block."""
  original = nn_ops.batch_norm
  nn_ops.batch_norm = function
  try:
    # Fused blocks normalise inside; every batch norm must be a call.
    with nn_ops.unfused():
      yield
  finally:
    nn_ops.batch_norm = original


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance over all axes but the last."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def make_batch_stats_fns(
  apply_batch_fn: Callable[[Params, jax.Array], jax.Array],
) -> tuple[Callable, Callable]:
  """Wrap a batch-statistics network into calibration-aware functions.

  Args:
    apply_batch_fn: `apply_batch_fn(params, images) -> logits`, computing
      batch norm through `ghn_jax.nn_ops.batch_norm`.

  Returns:
    (apply_fn, collect_fn): `apply_fn(params, images, batch_stats)` uses the
    given statistics (or the batch's own when `batch_stats` is None), and
    `collect_fn(params, images)` returns this batch's `BatchStats`.
  """
  original = nn_ops.batch_norm

  def collect_fn(params: Params, images: jax.Array) -> BatchStats:
    stats: BatchStats = []

    def recording_batch_norm(x, scale, bias, **kwargs):
      stats.append(_moments(x))
      return original(x, scale, bias, **kwargs)

    with _replaced_batch_norm(recording_batch_norm):
      apply_batch_fn(params, images)
    return stats

  def apply_fn(
    params: Params, images: jax.Array, batch_stats: BatchStats | None = None
  ) -> jax.Array:
    if batch_stats is None:
      return apply_batch_fn(params, images)
    remaining = iter(batch_stats)

    def running_batch_norm(x, scale, bias, *, epsilon=nn_ops.NORM_EPSILON):
      mean, variance = next(remaining)
      return (x - mean) * jax.lax.rsqrt(variance + epsilon) * scale + bias

    with _replaced_batch_norm(running_batch_norm):
      return apply_batch_fn(params, images)

  return apply_fn, collect_fn


def count_batch_norm_calls(
  collect_fn: Callable, params: Params, images: jax.Array
) -> int:
  """Count the batch-norm calls of one forward pass (traced, not run)."""
  return len(jax.eval_shape(collect_fn, params, images))


def make_flax_batch_norm_fns(
  model: nn.Module,
  batch_stats_template: Params,
  apply_kwargs_batch: Mapping[str, Any] | None = None,
  apply_kwargs_running: Mapping[str, Any] | None = None,
) -> tuple[Callable, Callable]:
  """Calibration-aware functions for a model built with `flax.linen.BatchNorm`.

  Such a model (e.g. the ResNets of `ghn_jax.zoo`) takes a `train` flag:
  with `train=True` its batch-norm layers use the batch's statistics, and
  with `train=False` the 'batch_stats' collection. Batch statistics are
  read from the inputs of every `nn.BatchNorm` call (mean and biased
  variance over all axes but the last, Flax's defaults).

  Args:
    model: the Flax module.
    batch_stats_template: the model's 'batch_stats' collection (shapes).
    apply_kwargs_batch: keyword arguments that select batch statistics
      (default {'train': True}).
    apply_kwargs_running: keyword arguments that select running statistics
      (default {'train': False}).

  Returns:
    (apply_fn, collect_fn) as `make_batch_stats_fns` returns; the
    statistics are a 'batch_stats' pytree of {'mean', 'var'} leaves.
  """
  batch_kwargs = dict(apply_kwargs_batch or {"train": True})
  running_kwargs = dict(apply_kwargs_running or {"train": False})

  def apply_fn(
    params: Params, images: jax.Array, batch_stats: Params | None = None
  ) -> jax.Array:
    if batch_stats is None:
      variables = {"params": params, "batch_stats": batch_stats_template}
      logits, _ = model.apply(
        variables, images, mutable=["batch_stats"], **batch_kwargs
      )
      return logits
    variables = {"params": params, "batch_stats": batch_stats}
    return model.apply(variables, images, **running_kwargs)

  def collect_fn(params: Params, images: jax.Array) -> Params:
    flat = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.BatchNorm) and context.method_name == (
        "__call__"
      ):
        mean, variance = _moments(args[0])
        flat[(*context.module.path, "mean")] = mean
        flat[(*context.module.path, "var")] = variance
      return next_fun(*args, **kwargs)

    variables = {"params": params, "batch_stats": batch_stats_template}
    with nn.intercept_methods(interceptor):
      model.apply(variables, images, mutable=["batch_stats"], **batch_kwargs)
    return traverse_util.unflatten_dict(flat)

  return apply_fn, collect_fn
