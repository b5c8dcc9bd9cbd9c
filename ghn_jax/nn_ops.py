"""Pure functions for every computation of the DeepNets-1M networks.

Each Flax module of `ghn_jax.deepnets1m.net` computes only through these
functions, so a caller can wrap them (for example with `jax.jit`, so that
each op compiles once per shape signature and is shared by all networks)
without touching the network code. Arrays are NHWC, conv kernels HWIO and
dense kernels (in, out). Every non-array argument is keyword-only and
hashable (ints, floats, bools and tuples), so it can be a static argument
of `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

# Epsilon of PyTorch's BatchNorm2d and LayerNorm, which the original networks
# use with their default settings.
NORM_EPSILON = 1e-5
_CONV_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv2d(
  x: Array,
  kernel: Array,
  *,
  stride: tuple[int, int] = (1, 1),
  padding: Padding = ((0, 0), (0, 0)),
  dilation: tuple[int, int] = (1, 1),
  groups: int = 1,
) -> Array:
  """Apply a 2-D convolution without bias.

  Args:
    x: input, (batch, height, width, in_channels).
    kernel: HWIO kernel, (kh, kw, in_channels // groups, out_channels).
    stride: stride along height and width.
    padding: zero padding ((top, bottom), (left, right)).
    dilation: kernel dilation along height and width.
    groups: number of channel groups (in_channels for a depthwise conv).

  Returns:
    The output, (batch, out_height, out_width, out_channels).
  """
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=stride,
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=_CONV_DIMENSION_NUMBERS,
    feature_group_count=groups,
  )


def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
  """Apply a linear layer `x @ kernel + bias` over the last axis."""
  y = jnp.dot(x, kernel)
  if bias is not None:
    y = y + bias
  return y


def batch_norm(
  x: Array, scale: Array, bias: Array, *, epsilon: float = NORM_EPSILON
) -> Array:
  """Normalise NHWC features with the statistics of the current batch.

  This is PyTorch's BatchNorm2d in training mode without running statistics:
  mean and biased variance over batch, height and width.

  Args:
    x: input, (batch, height, width, channels).
    scale: per-channel scale, (channels,).
    bias: per-channel bias, (channels,).
    epsilon: added to the variance.

  Returns:
    The normalised input, same shape as `x`.
  """
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  variance = jnp.mean(jnp.square(x - mean), axis=axes)
  return (x - mean) * jax.lax.rsqrt(variance + epsilon) * scale + bias


def layer_norm(
  x: Array, scale: Array, bias: Array, *, epsilon: float = NORM_EPSILON
) -> Array:
  """Normalise over the last axis (biased variance), then scale and shift."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + epsilon) * scale + bias


def max_pool(x: Array, *, window: int, stride: int, padding: int) -> Array:
  """Apply square max pooling; padded positions never win the max."""
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    ((0, 0), (padding, padding), (padding, padding), (0, 0)),
  )


def avg_pool(x: Array, *, window: int, stride: int, padding: int) -> Array:
  """Apply square average pooling that ignores padded positions.

  This matches PyTorch's AvgPool2d with `count_include_pad=False`.
  """
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  dims = (1, window, window, 1)
  strides = (1, stride, stride, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pads)
  return total / count


def global_avg_pool(x: Array) -> Array:
  """Average NHWC features over height and width: (batch, channels)."""
  return jnp.mean(x, axis=(1, 2))


def flatten_channels_first(x: Array) -> Array:
  """Flatten NHWC features in (channel, height, width) order.

  The order is PyTorch's, so a classifier weight of the original network
  applies unchanged (transposed) to the flattened features.
  """
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def subsample(x: Array, *, stride: int, offset: int = 0) -> Array:
  """Keep every `stride`-th row and column of NHWC features from `offset`."""
  if stride == 1 and offset == 0:
    return x
  return x[:, offset::stride, offset::stride, :]


def relu(x: Array) -> Array:
  """Apply the rectified linear unit."""
  return jax.nn.relu(x)


def gelu(x: Array) -> Array:
  """Apply the exact (erf-based) GELU, PyTorch's default."""
  return jax.nn.gelu(x, approximate=False)


def hard_swish(x: Array) -> Array:
  """Apply `x * relu6(x + 3) / 6` (PyTorch's Hardswish)."""
  return jax.nn.hard_swish(x)


def add(x: Array, y: Array) -> Array:
  """Add two arrays of the same shape."""
  return x + y


def concatenate(xs: tuple[Array, ...]) -> Array:
  """Concatenate NHWC features along channels."""
  if len(xs) == 1:
    return xs[0]
  return jnp.concatenate(xs, axis=-1)


def zeros_like(x: Array) -> Array:
  """Return zeros of the shape and dtype of `x`."""
  return jnp.zeros_like(x)


def scale_channels(x: Array, gate: Array) -> Array:
  """Multiply NHWC features by a per-example channel gate (batch, C)."""
  return x * gate[:, None, None, :]


def image_to_tokens(x: Array) -> Array:
  """Reshape NHWC features to tokens (batch, height * width, channels)."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


def tokens_to_image(x: Array, *, height: int, width: int) -> Array:
  """Reshape tokens (batch, height * width, channels) to NHWC features."""
  return x.reshape(x.shape[0], height, width, x.shape[-1])


def attention(qkv: Array, *, num_heads: int) -> Array:
  """Apply multi-head softmax self-attention to packed projections.

  Args:
    qkv: (batch, tokens, 3 * inner_dim), the query, key and value projections
      concatenated in that order; each splits into `num_heads` heads of
      `inner_dim // num_heads` features (head-major).
    num_heads: number of attention heads.

  Returns:
    The attended values, (batch, tokens, inner_dim), heads concatenated.
  """
  batch, tokens, width = qkv.shape
  head_dim = width // (3 * num_heads)
  qkv = qkv.reshape(batch, tokens, 3, num_heads, head_dim)
  query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * head_dim**-0.5
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
  return out.reshape(batch, tokens, num_heads * head_dim)


def dropout(x: Array, rng: Array, *, rate: float) -> Array:
  """Zero entries with probability `rate` and rescale the rest."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)
