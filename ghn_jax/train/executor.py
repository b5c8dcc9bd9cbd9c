"""Meta-training step without per-architecture compilation.

A meta-training step runs a GHN on a batch of graphs, builds each network's
parameters from the GHN's decoder outputs, classifies one image batch with
every network and backpropagates the mean cross-entropy into the GHN. A
`jax.jit` of that whole computation would compile one program per batch of
architectures, and meta-training draws from about a million. Here:

1. the GHN forward is one jitted function per padded size bucket, and its
   backward a jitted `jax.vjp` that recomputes the forward (so it is keyed
   on shapes only);
2. each predicted tensor is cut out of the decoder outputs by a jitted
   function keyed on the tensor's shape and layout, with its position in
   the outputs passed as an array, and its gradient is added back into the
   outputs' cotangent in place (buffer donation);
3. the networks run block by block in Python: each conv block (ReLU, one
   or two convs, batch norm) is one `nn_ops.conv_block` call, and it and
   the other heavy `ghn_jax.nn_ops` functions compile once per signature
   (see `nn_ops.compile_per_signature`); the glue ops (add, concatenate)
   dispatch eagerly and JAX caches them per shape.

So the number of compilations is bounded by the number of size buckets and
op signatures, not by the number of architectures (`compile_count`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ghn_jax import ghn as ghn_lib
from ghn_jax import ghn_inputs, graph_builder
from ghn_jax.deepnets1m import NetConfig, Network
from ghn_jax.train import padding

PyTree = Any
# Decoder outputs the predicted tensors are read from.
DECODED_KEYS = ("vector", "class_bias", "class_weight", "blocks")
_GRAPH_CACHE_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class MetaBatch:
  """Networks of one meta-training step, with their padded GHN inputs.

  Attributes:
    net_configs: architecture of each network.
    networks: the Flax networks.
    inputs: padded GHN inputs of all graphs (`ghn.prepare_inputs`).
    plans: for each network, how each of its tensors is read from the
      GHN's decoder outputs.
    arch_ids: identifier of each architecture (for logs and errors).
  """

  net_configs: tuple[NetConfig, ...]
  networks: tuple[nn.Module, ...]
  inputs: dict[str, Any]
  plans: tuple[tuple[ghn_inputs.TensorPlan, ...], ...]
  arch_ids: tuple[int, ...]

  @property
  def size(self) -> int:
    return len(self.networks)


@functools.lru_cache(maxsize=_GRAPH_CACHE_SIZE)
def build_network_graph(config: NetConfig):
  """Build (and cache) the computational graph of a DeepNets-1M network."""
  size = config.input_size
  return graph_builder.build_graph(
    Network(config), input_shape=(1, size, size, 3)
  )


def prepare_meta_batch(
  ghn_config: ghn_lib.GHNConfig,
  net_configs: Sequence[NetConfig],
  arch_ids: Sequence[int] | None = None,
  padder: padding.GrowingPadder | None = None,
) -> MetaBatch:
  """Build the networks and graphs of a meta-batch and pad them (host side).

  Args:
    ghn_config: the GHN's config (decoder sizes, virtual edges).
    net_configs: one architecture per network.
    arch_ids: identifiers of the architectures; default 0..M-1.
    padder: pads the GHN inputs further to sizes that only grow, so that
      the GHN compiles a bounded number of times over a run.

  Returns:
    The meta-batch.

  Raises:
    ValueError: if `net_configs` is empty.
  """
  if not net_configs:
    raise ValueError("net_configs is empty: pass at least one network.")
  if arch_ids is None:
    arch_ids = range(len(net_configs))
  graphs = [build_network_graph(c) for c in net_configs]
  inputs, plans = ghn_lib.prepare_inputs(ghn_config, graphs)
  if padder is not None:
    inputs = padder.pad(inputs)
  return MetaBatch(
    tuple(net_configs),
    tuple(Network(c) for c in net_configs),
    inputs,
    tuple(tuple(p) for p in plans),
    tuple(int(i) for i in arch_ids),
  )


@functools.cache
def ghn_functions(ghn_config: ghn_lib.GHNConfig):
  """Return the jitted GHN forward and backward of a config.

  Returns:
    `(forward_fn, backward_fn)`: `forward_fn(variables, inputs)` returns
    the decoder outputs; `backward_fn(variables, inputs, cotangent)`
    returns the gradient with respect to `variables`.
  """
  ghn = ghn_lib.GHN(ghn_config)

  def decode(variables, inputs):
    outputs = ghn.apply(variables, inputs)
    return {key: outputs[key] for key in DECODED_KEYS}

  def backward(variables, inputs, cotangent):
    _, vjp_fn = jax.vjp(lambda v: decode(v, inputs), variables)
    return vjp_fn(cotangent)[0]

  return jax.jit(decode), jax.jit(backward)


def _num_rows(plan: ghn_inputs.TensorPlan) -> int:
  """Rows of its decoder output that a tensor reads."""
  if plan.kind == ghn_inputs.CONV:
    return plan.kernel[0] * plan.kernel[1]
  return 1


def _leaf_key(plan: ghn_inputs.TensorPlan) -> tuple[str, ...]:
  """Path of the decoder output that a tensor is read from."""
  if plan.kind == ghn_inputs.CONV:
    return ("blocks", plan.block)
  return (plan.kind,)


def _static_plan(plan: ghn_inputs.TensorPlan) -> ghn_inputs.TensorPlan:
  """Drop what varies between architectures (path, position) from a plan."""
  return dataclasses.replace(plan, path="", index=0)


def _assemble_from_slab(slab: jax.Array, plan: ghn_inputs.TensorPlan):
  """Assemble a tensor from the rows of its decoder output only."""
  key = _leaf_key(plan)
  outputs = {key[0]: {key[1]: slab}} if len(key) == 2 else {key[0]: slab}
  return ghn_inputs.assemble_tensor(outputs, plan, jnp)


# The four functions below are split so that each compiles for few
# signatures: slicing and adding rows depend on the (bucketed) output shape
# and the row count only, assembling on the tensor's plan only.


@functools.partial(jax.jit, static_argnames="rows")
def _slice_rows(leaf, start, rows):
  return jax.lax.dynamic_slice_in_dim(leaf, start, rows)


@functools.partial(jax.jit, static_argnames="plan")
def _assemble_tensor(slab, plan):
  return _assemble_from_slab(slab, plan)


@functools.partial(jax.jit, static_argnames=("plan", "slab_shape"))
def _slab_cotangent(grad, plan, slab_shape):
  slab = jnp.zeros(slab_shape, grad.dtype)
  _, vjp_fn = jax.vjp(lambda s: _assemble_from_slab(s, plan), slab)
  return vjp_fn(grad)[0]


@functools.partial(jax.jit, donate_argnums=0)
def _add_rows(leaf_cotangent, start, slab_cotangent):
  rows = slab_cotangent.shape[0]
  current = jax.lax.dynamic_slice_in_dim(leaf_cotangent, start, rows)
  return jax.lax.dynamic_update_slice_in_dim(
    leaf_cotangent, current + slab_cotangent, start, 0
  )


def _get_leaf(outputs: dict, key: tuple[str, ...]) -> jax.Array:
  leaf = outputs
  for part in key:
    leaf = leaf[part]
  return leaf


def assemble_network_params(
  outputs: dict, plans: Sequence[ghn_inputs.TensorPlan]
) -> PyTree:
  """Cut one network's parameters out of the GHN's decoder outputs.

  Equals `ghn.assemble_params(outputs, plans, jnp)`, but compiles once per
  tensor shape and layout instead of once per tensor position.
  """
  flat = {}
  for plan in plans:
    leaf = _get_leaf(outputs, _leaf_key(plan))
    slab = _slice_rows(leaf, np.int32(plan.index), rows=_num_rows(plan))
    flat[tuple(plan.path.split("/"))] = _assemble_tensor(
      slab, plan=_static_plan(plan)
    )
  return traverse_util.unflatten_dict(flat)


def outputs_cotangent(
  outputs: dict,
  plans: Sequence[Sequence[ghn_inputs.TensorPlan]],
  grads: Sequence[PyTree],
) -> dict:
  """Sum the gradients of all predicted tensors into the decoder outputs.

  Args:
    outputs: the decoder outputs the tensors were cut from.
    plans: per network, the plans of its tensors.
    grads: per network, the gradient of the loss with respect to its params.

  Returns:
    The cotangent of `outputs` (same structure).
  """
  cotangent = jax.tree_util.tree_map(jnp.zeros_like, outputs)
  for network_plans, network_grads in zip(plans, grads, strict=True):
    flat_grads = traverse_util.flatten_dict(network_grads, sep="/")
    for plan in network_plans:
      key = _leaf_key(plan)
      parent = _get_leaf(cotangent, key[:-1])
      leaf = parent[key[-1]]
      slab_shape = (_num_rows(plan),) + tuple(leaf.shape[1:])
      slab_cotangent = _slab_cotangent(
        flat_grads[plan.path], plan=_static_plan(plan), slab_shape=slab_shape
      )
      parent[key[-1]] = _add_rows(leaf, np.int32(plan.index), slab_cotangent)
  return cotangent


def cross_entropy(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean softmax cross-entropy with integer labels and label smoothing."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(
    jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), label_smoothing
  )
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def networks_loss(
  params_list: Sequence[PyTree],
  networks: Sequence[nn.Module],
  images: jax.Array,
  labels: jax.Array,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Mean over networks of the cross-entropy on one image batch.

  Returns:
    `(loss, logits)`, logits stacked (num_networks, batch, classes).
  """
  logits = [
    net.apply({"params": params}, images)
    for net, params in zip(networks, params_list, strict=True)
  ]
  losses = [cross_entropy(y, labels, label_smoothing) for y in logits]
  return sum(losses) / len(losses), jnp.stack(logits)


def meta_value_and_grad(
  ghn_config: ghn_lib.GHNConfig,
  ghn_variables: PyTree,
  batch: MetaBatch,
  images: jax.Array,
  labels: jax.Array,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, PyTree]:
  """Loss of a meta-batch and its gradient with respect to the GHN.

  Args:
    ghn_config: the GHN's config.
    ghn_variables: the GHN's variables (`{'params': ...}`).
    batch: the networks and their padded graphs.
    images: float (B, H, W, 3) images.
    labels: int (B,) labels.
    label_smoothing: label smoothing of the cross-entropy.

  Returns:
    `(loss, logits, grads)`: the mean cross-entropy over the networks, their
    logits (M, B, classes) and the gradient (structure of `ghn_variables`).
  """
  forward_fn, backward_fn = ghn_functions(ghn_config)
  outputs = forward_fn(ghn_variables, batch.inputs)
  params_list = [assemble_network_params(outputs, p) for p in batch.plans]

  def loss_fn(params_list):
    return networks_loss(
      params_list, batch.networks, images, labels, label_smoothing
    )

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params_list)
  cotangent = outputs_cotangent(outputs, batch.plans, grads)
  ghn_grads = backward_fn(ghn_variables, batch.inputs, cotangent)
  return loss, logits, ghn_grads


def reference_value_and_grad(
  ghn_config: ghn_lib.GHNConfig,
  ghn_variables: PyTree,
  batch: MetaBatch,
  images: jax.Array,
  labels: jax.Array,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, PyTree]:
  """Compute what `meta_value_and_grad` computes, as one jitted program.

  Compiles once per meta-batch of architectures: for tests and small runs.
  """
  ghn = ghn_lib.GHN(ghn_config)

  def loss_fn(variables, inputs, images, labels):
    outputs = ghn.apply(variables, inputs)
    params_list = [
      ghn_lib.assemble_params(outputs, p, jnp) for p in batch.plans
    ]
    return networks_loss(
      params_list, batch.networks, images, labels, label_smoothing
    )

  value_and_grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, logits), grads = value_and_grad_fn(
    ghn_variables, batch.inputs, images, labels
  )
  return loss, logits, grads


def split_meta_batch(
  ghn_config: ghn_lib.GHNConfig,
  net_configs: Sequence[NetConfig],
  arch_ids: Sequence[int],
  num_shards: int,
  padder: padding.GrowingPadder | None = None,
) -> list[MetaBatch]:
  """Split a meta-batch into `num_shards` contiguous, separately padded parts.

  Raises:
    ValueError: if there are fewer networks than shards.
  """
  if len(net_configs) < num_shards:
    raise ValueError(
      f"A meta-batch of {len(net_configs)} networks cannot be split over "
      f"{num_shards} devices: use a meta-batch of at least {num_shards}."
    )
  bounds = np.linspace(0, len(net_configs), num_shards + 1).astype(int)
  return [
    prepare_meta_batch(ghn_config, net_configs[a:b], arch_ids[a:b], padder)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True)
  ]


def sharded_value_and_grad(
  ghn_config: ghn_lib.GHNConfig,
  ghn_variables: PyTree,
  batches: Sequence[MetaBatch],
  images: jax.Array,
  labels: jax.Array,
  devices: Sequence[jax.Device],
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, PyTree]:
  """`meta_value_and_grad` with the networks of shard d on device d.

  Each device runs the GHN on its own graphs (padded to its own size
  buckets, so no common padding is needed) and its networks op by op; JAX
  dispatches asynchronously, so the devices work concurrently. The
  gradients are weighted by each shard's share of the networks and summed
  on the first device.

  Returns:
    `(loss, logits, grads)` as `meta_value_and_grad`, on `devices[0]`.
  """
  if len(batches) != len(devices):
    raise ValueError(
      f"Got {len(batches)} meta-batch shards for {len(devices)} devices."
    )
  total = sum(b.size for b in batches)
  results = []
  for batch, device in zip(batches, devices, strict=True):
    results.append(
      meta_value_and_grad(
        ghn_config,
        jax.device_put(ghn_variables, device),
        batch,
        jax.device_put(images, device),
        jax.device_put(labels, device),
        label_smoothing,
      )
    )

  first = devices[0]
  loss, logits, grads = 0.0, [], None
  for batch, (shard_loss, shard_logits, shard_grads) in zip(
    batches, results, strict=True
  ):
    weight = batch.size / total
    shard_grads = jax.device_put(shard_grads, first)
    scaled = jax.tree_util.tree_map(lambda g, w=weight: g * w, shard_grads)
    grads = (
      scaled
      if grads is None
      else jax.tree_util.tree_map(jnp.add, grads, scaled)
    )
    loss = loss + weight * jax.device_put(shard_loss, first)
    logits.append(jax.device_put(shard_logits, first))
  return loss, jnp.concatenate(logits), grads
