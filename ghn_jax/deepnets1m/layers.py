"""Flax modules of the DeepNets-1M networks, computing through `nn_ops`.

Every module that owns a parameter has a class attribute `ghn_primitive`:
the GHN-2 node type (see `ghn_jax.graph.PRIMITIVES`) of the node that
predicts its main weight (`kernel`, `scale` or `embedding`). A norm layer's
`bias` is predicted from the same node; a `Dense` bias is a node of type
`bias`. Blocks without parameters of their own (attention, squeeze-
excitation, pooling) carry the type of the op node they form.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax

from ghn_jax import nn_ops

# PyTorch's default init of conv and linear weights: uniform in
# +-1/sqrt(fan_in), i.e. variance 1 / (3 * fan_in).
default_kernel_init = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)


class Conv(nn.Module):
  """2-D convolution without bias (`kernel`: HWIO)."""

  features: int
  kernel_size: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: nn_ops.Padding = ((0, 0), (0, 0))
  dilation: tuple[int, int] = (1, 1)
  groups: int = 1

  ghn_primitive: ClassVar[str] = "conv"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    kernel = self.param(
      "kernel",
      default_kernel_init,
      (*self.kernel_size, in_features // self.groups, self.features),
    )
    return nn_ops.conv2d(
      x,
      kernel,
      stride=self.stride,
      padding=self.padding,
      dilation=self.dilation,
      groups=self.groups,
    )


class SepConvDepthwise(Conv):
  """Depthwise convolution of a separable conv (GHN type `sep_conv`)."""

  ghn_primitive: ClassVar[str] = "sep_conv"


class DilConvDepthwise(Conv):
  """Dilated depthwise convolution (GHN type `dil_conv`)."""

  ghn_primitive: ClassVar[str] = "dil_conv"


class Dense(nn.Module):
  """Linear layer (`kernel`: (in, out)); its weight node is a `conv`."""

  features: int
  use_bias: bool = True

  ghn_primitive: ClassVar[str] = "conv"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel", default_kernel_init, (x.shape[-1], self.features)
    )
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return nn_ops.dense(x, kernel, bias)


class BatchNorm(nn.Module):
  """Batch norm with the statistics of the current batch (no state)."""

  ghn_primitive: ClassVar[str] = "bn"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    return nn_ops.batch_norm(x, scale, bias)


class LayerNorm(nn.Module):
  """Layer norm over the last axis."""

  ghn_primitive: ClassVar[str] = "ln"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    return nn_ops.layer_norm(x, scale, bias)


class PosEnc(nn.Module):
  """Learned positional encoding added to NHWC features.

  `embedding` has shape (1, height, width, channels); the GHN node carries
  the original's layout (1, channels, height, width).
  """

  ghn_primitive: ClassVar[str] = "pos_enc"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embedding = self.param(
      "embedding", nn.initializers.normal(1.0), (1, *x.shape[1:])
    )
    return nn_ops.add(x, embedding)


class MaxPool(nn.Module):
  """Square max pooling with padding `window // 2`."""

  window: int = 3
  stride: int = 1

  ghn_primitive: ClassVar[str] = "max_pool"

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn_ops.max_pool(
      x, window=self.window, stride=self.stride, padding=self.window // 2
    )


class AvgPool(nn.Module):
  """Square average pooling (padding `window // 2`, not counted)."""

  window: int = 3
  stride: int = 1

  ghn_primitive: ClassVar[str] = "avg_pool"

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn_ops.avg_pool(
      x, window=self.window, stride=self.stride, padding=self.window // 2
    )


def maybe_batch_norm(norm: str | None, name: str) -> nn.Module | None:
  """Return a BatchNorm named `name`, or None when `norm` is None."""
  return BatchNorm(name=name) if norm is not None else None


def _apply_norm(norm_layer: nn.Module | None, x: jax.Array) -> jax.Array:
  return x if norm_layer is None else norm_layer(x)


def _same_padding(kernel: int, dilation: int = 1) -> nn_ops.Padding:
  pad = dilation * (kernel - 1) // 2
  return ((pad, pad), (pad, pad))


class ConvStep(NamedTuple):
  """One conv of `conv_steps`: its module class, name, size and settings."""

  module: type[Conv]
  name: str
  features: int
  kernel_size: tuple[int, int]
  spec: nn_ops.ConvSpec = nn_ops.POINTWISE


def _kernels_match(params, convs: tuple[ConvStep, ...], channels: int) -> bool:
  """Return whether the convs' kernels have the shapes the steps create.

  A mismatch goes to the separate steps, where Flax reports it.
  """
  for step in convs:
    expected = (*step.kernel_size, channels // step.spec.groups, step.features)
    if params[step.name]["kernel"].shape != expected:
      return False
    channels = step.features
  return True


def conv_steps(
  parent: nn.Module,
  x: jax.Array,
  convs: tuple[ConvStep, ...],
  norm_name: str | None,
  relu: bool,
) -> jax.Array:
  """Apply ReLU (optional), one or two convs and batch norm (optional).

  The parameters live in child modules (`Conv` and `BatchNorm`, named as
  given), so the parameter tree and the GHN's graph are those of the
  separate steps. Once the parameters exist (not while they are created)
  and unless `nn_ops.unfused` is active, the steps run as one
  `nn_ops.conv_block`, reading the children's parameters directly.

  Args:
    parent: the calling module (inside its compact `__call__`).
    x: the input.
    convs: one or two convs, applied in order.
    norm_name: name of the BatchNorm child, or None for no batch norm.
    relu: apply ReLU to `x` first.

  Returns:
    The output.
  """
  names = [step.name for step in convs]
  if norm_name is not None:
    names.append(norm_name)
  params = parent.variables.get("params", {})
  if (
    nn_ops.fusion_enabled()
    and all(name in params for name in names)
    and _kernels_match(params, convs, x.shape[-1])
  ):
    kernels = [params[step.name]["kernel"] for step in convs]
    scale = bias = None
    if norm_name is not None:
      scale, bias = params[norm_name]["scale"], params[norm_name]["bias"]
    second = convs[1].spec if len(convs) > 1 else nn_ops.POINTWISE
    return nn_ops.conv_block(
      x,
      kernels[0],
      kernels[1] if len(convs) > 1 else None,
      scale,
      bias,
      relu=relu,
      conv=convs[0].spec,
      conv2=second,
    )
  if relu:
    x = nn_ops.relu(x)
  for step in convs:
    x = step.module(
      step.features,
      step.kernel_size,
      stride=step.spec.stride,
      padding=step.spec.padding,
      dilation=step.spec.dilation,
      groups=step.spec.groups,
      name=step.name,
    )(x)
  if norm_name is not None:
    x = BatchNorm(name=norm_name)(x)
  return x


class ReLUConvBN(nn.Module):
  """ReLU, conv (k x k, or 1 x k then k x 1 when `double`), batch norm."""

  features: int
  kernel_size: int
  stride: int = 1
  norm: str | None = "bn"
  double: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, pad = self.kernel_size, self.stride, self.kernel_size // 2
    if self.double:
      convs = (
        ConvStep(
          Conv,
          "conv_1xk",
          x.shape[-1],
          (1, k),
          nn_ops.ConvSpec((1, s), ((0, 0), (pad, pad))),
        ),
        ConvStep(
          Conv,
          "conv_kx1",
          self.features,
          (k, 1),
          nn_ops.ConvSpec((s, 1), ((pad, pad), (0, 0))),
        ),
      )
    else:
      convs = (
        ConvStep(
          Conv,
          "conv",
          self.features,
          (k, k),
          nn_ops.ConvSpec((s, s), _same_padding(k)),
        ),
      )
    norm_name = "bn" if self.norm is not None else None
    return conv_steps(self, x, convs, norm_name, relu=True)


def _depthwise_then_pointwise(
  depthwise: type[Conv],
  suffix: str,
  channels: int,
  features: int,
  kernel_size: int,
  stride: int,
  dilation: int,
) -> tuple[ConvStep, ConvStep]:
  """Return the two convs of a separable (or dilated) conv block."""
  spec = nn_ops.ConvSpec(
    (stride, stride),
    _same_padding(kernel_size, dilation),
    (dilation, dilation),
    channels,
  )
  return (
    ConvStep(
      depthwise,
      f"depthwise{suffix}",
      channels,
      (kernel_size, kernel_size),
      spec,
    ),
    ConvStep(Conv, f"pointwise{suffix}", features, (1, 1)),
  )


class SepConv(nn.Module):
  """Two ReLU, depthwise conv, 1x1 conv, batch norm blocks (DARTS)."""

  features: int
  kernel_size: int
  stride: int = 1
  norm: str | None = "bn"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    for block, stride, out in (
      (1, self.stride, channels),
      (2, 1, self.features),
    ):
      convs = _depthwise_then_pointwise(
        SepConvDepthwise, str(block), channels, out, self.kernel_size, stride, 1
      )
      norm_name = f"bn{block}" if self.norm is not None else None
      x = conv_steps(self, x, convs, norm_name, relu=True)
    return x


class DilConv(nn.Module):
  """ReLU, dilated (2) depthwise conv, 1x1 conv, batch norm (DARTS)."""

  features: int
  kernel_size: int
  stride: int = 1
  norm: str | None = "bn"

  # Dilation of `dil_conv` operations.
  dilation: ClassVar[int] = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    convs = _depthwise_then_pointwise(
      DilConvDepthwise,
      "",
      x.shape[-1],
      self.features,
      self.kernel_size,
      self.stride,
      self.dilation,
    )
    norm_name = "bn" if self.norm is not None else None
    return conv_steps(self, x, convs, norm_name, relu=True)


class FactorizedReduce(nn.Module):
  """Halve the resolution with two offset 1x1 stride-2 convs (DARTS)."""

  features: int
  norm: str | None = "bn"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.features % 2:
      raise ValueError(
        f"FactorizedReduce needs an even number of features, got "
        f"{self.features}; use an even channel count."
      )
    half = self.features // 2
    x = nn_ops.relu(x)
    even = Conv(half, (1, 1), stride=(2, 2), name="conv1")(x)
    odd = Conv(half, (1, 1), name="conv2")(
      nn_ops.subsample(x, stride=2, offset=1)
    )
    x = nn_ops.concatenate((even, odd))
    return _apply_norm(maybe_batch_norm(self.norm, "bn"), x)


class Transformer(nn.Module):
  """Pre-norm transformer block on the tokens of NHWC features (`msa`).

  Layer norm, multi-head self-attention (the query/key/value projection has
  no bias), residual; layer norm, two-layer GELU MLP, residual; then
  subsampling by `stride`.
  """

  features: int
  num_heads: int = 8
  stride: int = 1

  ghn_primitive: ClassVar[str] = "msa"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, channels = x.shape
    if self.features != channels:
      raise ValueError(
        f"The msa block maps {channels} channels to {self.features}; "
        "input and output channels must match."
      )
    inner = (channels // self.num_heads) * self.num_heads
    if inner == 0:
      raise ValueError(
        f"The msa block needs at least {self.num_heads} channels, got "
        f"{channels}."
      )
    tokens = nn_ops.image_to_tokens(x)
    h = LayerNorm(name="ln1")(tokens)
    qkv = Dense(3 * inner, use_bias=False, name="to_qkv")(h)
    h = nn_ops.attention(qkv, num_heads=self.num_heads)
    h = Dense(self.features, name="to_out")(h)
    tokens = nn_ops.add(h, tokens)
    h = LayerNorm(name="ln2")(tokens)
    h = nn_ops.gelu(Dense(self.features, name="ff1")(h))
    h = Dense(channels, name="ff2")(h)
    tokens = nn_ops.add(h, tokens)
    x = nn_ops.tokens_to_image(tokens, height=height, width=width)
    return nn_ops.subsample(x, stride=self.stride)


class ChannelSE(nn.Module):
  """Channel squeeze-excitation (`cse`) with a hard-swish gate.

  Global average pooling, dense (channels / 2) with ReLU, dense (channels)
  with hard swish, channel-wise product with the input, subsampling.
  """

  features: int
  reduction: int = 2
  stride: int = 1

  ghn_primitive: ClassVar[str] = "cse"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if self.features != channels:
      raise ValueError(
        f"The cse block maps {channels} channels to {self.features}; "
        "input and output channels must match."
      )
    squeezed = nn_ops.global_avg_pool(x)
    gate = nn_ops.relu(Dense(channels // self.reduction, name="fc1")(squeezed))
    gate = nn_ops.hard_swish(Dense(channels, name="fc2")(gate))
    return nn_ops.subsample(nn_ops.scale_channels(x, gate), stride=self.stride)
