"""Flax networks of the DeepNets-1M design space (`Network(config)`).

A network is a stem, `num_cells` cells of the genotype (reduction cells at
`num_cells // 3` and `2 * num_cells // 3`) and a classifier, as in the
original's `ppuda.deepnets1m.net.Network` (Knyazev et al., 2021, built on
the DARTS search space). Inputs are NHWC images; the output is the logits.
Batch norm always uses the statistics of the current batch, so the
network has only a `params` collection.

Departures from the original:
  - Modules whose output does not reach the logits are not created (the
    original creates them, and its GHN deletes them before predicting).
    `plan.param_specs` lists all parameters of the original with their
    Flax paths; `plan.count_params(config, include_dead=True)` counts as
    the original's generator does.
  - No auxiliary head and no drop-path (DeepNets-1M networks use neither).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ghn_jax import nn_ops
from ghn_jax.deepnets1m import layers
from ghn_jax.deepnets1m.config import NetConfig, config_from_net_args
from ghn_jax.deepnets1m.plan import (
  MSA_NUM_HEADS,
  POOL_WINDOW,
  VIT_PATCH_SIZE_CIFAR,
  VIT_PATCH_SIZE_IMAGENET,
  CellPlan,
  build_plan,
  param_specs,
  parse_op,
)

# Dropout between the classifier's dense layers when `train=True`.
CLASSIFIER_DROPOUT_RATE = 0.5

__all__ = [
  "Cell",
  "NetConfig",
  "Network",
  "abstract_params",
  "config_from_net_args",
]


def abstract_params(config: NetConfig, dtype=jnp.float32) -> dict:
  """Return the `params` tree of `Network(config)` as shape structs.

  Built from `plan.param_specs` without tracing the network, so it costs
  milliseconds where `jax.eval_shape(Network(config).init, ...)` costs a
  trace of every module.

  Args:
    config: the network.
    dtype: dtype of every parameter.

  Returns:
    A nested dict of `jax.ShapeDtypeStruct`, as `init(...)["params"]`.
  """
  flat = {
    spec.path: jax.ShapeDtypeStruct(spec.shape, dtype)
    for spec in param_specs(config)
    if spec.live
  }
  return traverse_util.unflatten_dict(flat, sep="/")


def make_operation(
  op: str, features: int, stride: int, norm: str | None, name: str
) -> nn.Module | None:
  """Create the module of a genotype operation (None for identity).

  Args:
    op: operation name from `genotypes.OPERATIONS` (not 'none').
    features: output channels.
    stride: 1, or 2 on the edges of a reduction cell that read its inputs.
    norm: 'bn' or None.
    name: module name.

  Returns:
    The module, or None for a stride-1 `skip_connect` (identity).
  """
  kind, kernel = parse_op(op)
  if kind == "max_pool":
    return layers.MaxPool(kernel, stride, name=name)
  if kind == "avg_pool":
    return layers.AvgPool(kernel, stride, name=name)
  if kind == "skip_connect":
    if stride == 1:
      return None
    return layers.FactorizedReduce(features, norm, name=name)
  if kind in ("conv", "conv_double"):
    return layers.ReLUConvBN(
      features, kernel, stride, norm, kind == "conv_double", name=name
    )
  if kind == "sep_conv":
    return layers.SepConv(features, kernel, stride, norm, name=name)
  if kind == "dil_conv":
    return layers.DilConv(features, kernel, stride, norm, name=name)
  if kind == "msa":
    return layers.Transformer(features, MSA_NUM_HEADS, stride, name=name)
  if kind == "cse":
    return layers.ChannelSE(features, stride=stride, name=name)
  raise ValueError(f"Operation {op!r} has no module.")


class Cell(nn.Module):
  """One cell: preprocess both inputs, sum nodes, concatenation.

  Attributes:
    plan: static structure of the cell (`plan.CellPlan`).
    norm: 'bn' or None.
    preprocess: 1x1 conv (or factorised reduction) on the inputs.
  """

  plan: CellPlan
  norm: str | None
  preprocess: bool

  def _preprocess(self, which: int, x: jax.Array) -> jax.Array:
    plan = self.plan
    name = f"preprocess{which}"
    reduce_input = which == 0 and plan.reduction_prev
    if not self.preprocess:
      return nn_ops.subsample(x, stride=2) if reduce_input else x
    if reduce_input:
      return layers.FactorizedReduce(plan.channels_out, self.norm, name=name)(x)
    return layers.ReLUConvBN(plan.channels_out, 1, 1, self.norm, name=name)(x)

  @nn.compact
  def __call__(self, s0: jax.Array | None, s1: jax.Array | None) -> jax.Array:
    plan = self.plan
    states = []
    for which, x in enumerate((s0, s1)):
      live = plan.preprocess_live[which]
      states.append(self._preprocess(which, x) if live else None)

    for step in range(len(plan.edges) // 2):
      total = None
      for edge in (2 * step, 2 * step + 1):
        if not plan.edge_live[edge]:
          continue
        op, source = plan.edges[edge]
        module = make_operation(
          op, plan.channels_out, plan.strides[edge], self.norm, f"ops_{edge}"
        )
        h = states[source] if module is None else module(states[source])
        total = h if total is None else nn_ops.add(total, h)
      states.append(total)

    # An empty state (all its operations are 'none') joins the
    # concatenation as zeros, as in the original.
    parts = [states[i] for i in plan.concat]
    reference = next(x for x in parts if x is not None)
    parts = [nn_ops.zeros_like(reference) if x is None else x for x in parts]
    return nn_ops.concatenate(tuple(parts))


class SimpleStem(nn.Module):
  """Conv (stride 4 on ImageNet), batch norm, optional 3x3 max pooling."""

  features: int
  kernel_size: int
  stride: int
  norm: str | None
  pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, pad, s = self.kernel_size, self.kernel_size // 2, self.stride
    conv = layers.ConvStep(
      layers.Conv,
      "conv",
      self.features,
      (k, k),
      nn_ops.ConvSpec((s, s), ((pad, pad), (pad, pad))),
    )
    norm_name = "bn" if self.norm is not None else None
    x = layers.conv_steps(self, x, (conv,), norm_name, relu=False)
    if self.pool:
      x = layers.MaxPool(POOL_WINDOW, 2, name="pool")(x)
    return x


class DartsStem0(nn.Module):
  """First DARTS/ImageNet stem: conv (C/2), BN, ReLU, 3x3 conv (C), BN."""

  features: int
  kernel_size: int
  stride: int
  norm: str | None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, pad, s = self.kernel_size, self.kernel_size // 2, self.stride
    first = layers.ConvStep(
      layers.Conv,
      "conv1",
      self.features // 2,
      (k, k),
      nn_ops.ConvSpec((s, s), ((pad, pad), (pad, pad))),
    )
    second = layers.ConvStep(
      layers.Conv,
      "conv2",
      self.features,
      (3, 3),
      nn_ops.ConvSpec((s, s), ((1, 1), (1, 1))),
    )
    with_norm = self.norm is not None
    x = layers.conv_steps(
      self, x, (first,), "bn1" if with_norm else None, relu=False
    )
    return layers.conv_steps(
      self, x, (second,), "bn2" if with_norm else None, relu=True
    )


class DartsStem1(nn.Module):
  """Second DARTS/ImageNet stem: ReLU, 3x3 stride-2 conv, BN."""

  features: int
  norm: str | None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = layers.ConvStep(
      layers.Conv,
      "conv",
      self.features,
      (3, 3),
      nn_ops.ConvSpec((2, 2), ((1, 1), (1, 1))),
    )
    norm_name = "bn" if self.norm is not None else None
    return layers.conv_steps(self, x, (conv,), norm_name, relu=True)


class PatchStem(nn.Module):
  """ViT stem: a conv with kernel = stride = patch size, no bias."""

  features: int
  patch_size: int
  padding: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, pad = self.patch_size, self.padding
    return layers.Conv(
      self.features,
      (p, p),
      stride=(p, p),
      padding=((pad, pad), (pad, pad)),
      name="conv",
    )(x)


class Classifier(nn.Module):
  """Dense layers with ReLU (and dropout when training) in between."""

  num_classes: int
  num_layers: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    num_layers = max(self.num_layers, 1)
    for layer in range(num_layers):
      last = layer == num_layers - 1
      features = self.num_classes if last else self.hidden_dim
      x = layers.Dense(features, name=f"fc{layer}")(x)
      if not last:
        x = nn_ops.relu(x)
        if train:
          x = nn_ops.dropout(
            x, self.make_rng("dropout"), rate=CLASSIFIER_DROPOUT_RATE
          )
    return x


class Network(nn.Module):
  """A DeepNets-1M network: stem, cells, classifier.

  Attributes:
    config: the architecture.

  Call with NHWC images (32x32 for CIFAR-size configs, 224x224 for ImageNet
  ones) and `train` (dropout in the classifier; needs a 'dropout' rng).
  Returns the logits (batch, num_classes).
  """

  config: NetConfig

  def _stem(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
    config = self.config
    plan = build_plan(config)
    kernel = config.stem_kernel_size
    if config.vit:
      if config.imagenet_input:
        patch, padding = VIT_PATCH_SIZE_IMAGENET, 0
      else:
        patch, padding = VIT_PATCH_SIZE_CIFAR, 1
      x = PatchStem(config.channels, patch, padding, name="stem0")(x)
      x = layers.PosEnc(name="pos_enc")(x)
      return x, x
    if config.stem_type == 0:
      stride = 4 if config.imagenet_input else 1
      x = SimpleStem(
        plan.stem_channels,
        kernel,
        stride,
        config.norm,
        config.stem_pool,
        name="stem",
      )(x)
      return x, x
    stride = 2 if config.imagenet_input else 1
    s0 = DartsStem0(config.channels, kernel, stride, config.norm, name="stem0")
    s0 = s0(x) if plan.stem_live[0] else None
    s1 = None
    if plan.stem_live[1]:
      s1 = DartsStem1(config.channels, config.norm, name="stem1")(s0)
    return s0, s1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    config = self.config
    plan = build_plan(config)
    expected = (config.input_size, config.input_size, 3)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(
        f"Network input has shape {x.shape}; expected NHWC images "
        f"(batch, {expected[0]}, {expected[1]}, 3)."
      )
    s0, s1 = self._stem(x)
    for cell_plan in plan.cells:
      if not cell_plan.live:
        s0, s1 = s1, None
        continue
      cell = Cell(
        cell_plan,
        config.norm,
        config.preprocess,
        name=f"cells_{cell_plan.index}",
      )
      s0, s1 = s1, cell(s0, s1)

    if config.global_pooling:
      features = nn_ops.global_avg_pool(s1)
    else:
      features = nn_ops.flatten_channels_first(s1)
    return Classifier(
      config.num_classes,
      config.num_fc_layers,
      config.fc_dim,
      name="classifier",
    )(features, train)
