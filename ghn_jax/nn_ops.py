"""Pure functions for every computation of the DeepNets-1M networks.

Each Flax module of `ghn_jax.deepnets1m.net` computes only through these
functions, so a caller can wrap them (for example with `jax.jit`, so that
each op compiles once per shape signature and is shared by all networks)
without touching the network code. Arrays are NHWC, conv kernels HWIO and
dense kernels (in, out). Every non-array argument is keyword-only and
hashable (ints, floats, bools and tuples), so it can be a static argument
of `jax.jit`.

The heavy ops (convolution, dense, normalisation, pooling, attention) are
wrapped by `compile_per_signature`: called eagerly, op by op, each compiles
one forward and one backward program per signature (input shapes and
dtypes, static arguments), shared by every network that uses it. Inside an
outer `jax.jit` they inline like plain functions. This is what lets
meta-training run a stream of distinct architectures without compiling
each one (see `ghn_jax.train.executor`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

# Epsilon of PyTorch's BatchNorm2d and LayerNorm, which the original networks
# use with their default settings.
NORM_EPSILON = 1e-5
_CONV_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def compile_per_signature(
  fn: Callable[..., Array] | None = None,
  *,
  vjp: Callable[..., tuple | None] | None = None,
) -> Callable[..., Array]:
  """Wrap an op so that its forward and backward compile once per signature.

  The wrapped op is a `jax.custom_vjp` whose forward and backward rules call
  module-level `jax.jit` functions, keyed only on the shapes and dtypes of
  the positional (array) arguments and on the keyword-only (static)
  arguments. Run eagerly under `jax.vjp`, every call with a seen signature
  reuses the compiled programs. The backward recomputes what it needs from
  the saved inputs, so no traced closure crosses from forward to backward
  (a closure would make a new jaxpr, hence a new compilation, on each call).

  NOTE: forward-mode differentiation (`jax.jvp`) of a wrapped op is not
  supported, as for any `jax.custom_vjp` function.

  Used as `@compile_per_signature` or `@compile_per_signature(vjp=rule)`.

  Args:
    fn: the op; arrays (or None) positional, everything else keyword-only.
    vjp: optional hand-written backward, called inside the jitted backward
      as `vjp(*arrays, cotangent, **static)`; it returns one cotangent per
      array argument (None for a None argument), or None to fall back to
      `jax.vjp` of `fn` (decided at trace time, e.g. per backend or shape).

  Returns:
    The wrapped op, with the signature of `fn`.
  """
  if fn is None:
    return functools.partial(compile_per_signature, vjp=vjp)
  signature = inspect.signature(fn)
  static_names = tuple(
    name
    for name, parameter in signature.parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
  )

  def call_fn(arrays, static):
    return fn(*arrays, **dict(static))

  @functools.partial(jax.jit, static_argnums=1)
  def forward(arrays, static):
    return call_fn(arrays, static)

  @functools.partial(jax.jit, static_argnums=1)
  def backward(arrays, static, cotangent):
    if vjp is not None:
      cotangents = vjp(*arrays, cotangent, **dict(static))
      if cotangents is not None:
        return tuple(cotangents)
    _, vjp_fn = jax.vjp(lambda *a: call_fn(a, static), *arrays)
    return vjp_fn(cotangent)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def differentiable(static, arrays):
    return wrapped.forward_fn(arrays, static)

  def differentiable_fwd(static, arrays):
    return wrapped.forward_fn(arrays, static), arrays

  def differentiable_bwd(static, arrays, cotangent):
    return (wrapped.backward_fn(arrays, static, cotangent),)

  differentiable.defvjp(differentiable_fwd, differentiable_bwd)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arrays = tuple(
      value
      for name, value in bound.arguments.items()
      if name not in static_names
    )
    static = tuple((name, bound.arguments[name]) for name in static_names)
    return differentiable(static, arrays)

  wrapped.forward_fn = forward
  wrapped.backward_fn = backward
  return wrapped


def _on_cpu() -> bool:
  """Return whether arrays live on the CPU, where hand-written kernels apply."""
  return jax.default_backend() == "cpu"


def _contract_rows(a: Array, b: Array) -> Array:
  """Return `a.T @ b` for 2-D `a` (M, P) and `b` (M, Q): (P, Q)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _is_pointwise(
  kernel: Array, stride: tuple[int, int], padding: Padding
) -> bool:
  """Return whether a dense conv is 1x1, stride 1 and unpadded (a matmul)."""
  return (
    kernel.shape[:2] == (1, 1)
    and stride == (1, 1)
    and padding == ((0, 0), (0, 0))
  )


def _conv2d_vjp(
  x: Array,
  kernel: Array,
  cotangent: Array,
  *,
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
  groups: int,
) -> tuple[Array, Array] | None:
  """Backward of a 1x1 conv as two matmuls on CPU; None otherwise.

  XLA's CPU gradient program for a 1x1 convolution measured 5-10x slower
  than the two matmuls it amounts to (batch 64, 32x32, 32-240 channels).
  For KxK kernels, one matmul per kernel tap for the kernel gradient
  measured 2-4x slower than XLA's gradient, which is kept.
  """
  del dilation  # A 1x1 kernel has no gaps.
  if not _on_cpu() or groups != 1 or not _is_pointwise(kernel, stride, padding):
    return None
  in_channels, out_channels = kernel.shape[2:]
  g = cotangent.reshape(-1, out_channels)
  rows = x.reshape(-1, in_channels)
  dx = jnp.dot(g, kernel[0, 0].T).reshape(x.shape)
  dkernel = _contract_rows(rows, g).reshape(kernel.shape)
  return dx, dkernel


def _channel_sums(rows: Array) -> Array:
  """Sum (M, C) rows over M: a matmul with ones on CPU, else a reduction.

  XLA's CPU reduction over the leading axis measured about 3x slower than
  the same sum as a (1, M) @ (M, C) matmul at M = 65536, C = 32.
  """
  if not _on_cpu():
    return jnp.sum(rows, axis=0)
  ones = jnp.ones((1, rows.shape[0]), rows.dtype)
  return jnp.dot(ones, rows)[0]


def _batch_statistics(rows: Array, epsilon: float) -> tuple[Array, Array]:
  """Mean and inverse standard deviation (biased) of (M, C) rows over M."""
  count = rows.shape[0]
  mean = _channel_sums(rows) / count
  variance = _channel_sums(jnp.square(rows - mean)) / count
  return mean, jax.lax.rsqrt(variance + epsilon)


def _batch_norm_vjp(
  x: Array, scale: Array, bias: Array, cotangent: Array, *, epsilon: float
) -> tuple[Array, Array, Array]:
  """Backward of batch norm with batch statistics in closed form."""
  del bias
  rows = x.reshape(-1, x.shape[-1])
  g = cotangent.reshape(rows.shape)
  mean, inv_std = _batch_statistics(rows, epsilon)
  normalised = (rows - mean) * inv_std
  dbias = _channel_sums(g)
  dscale = _channel_sums(g * normalised)
  count = rows.shape[0]
  dx = (scale * inv_std) * (g - (dbias + normalised * dscale) / count)
  return dx.reshape(x.shape), dscale, dbias


def _max_pool_vjp(
  x: Array, cotangent: Array, *, window: int, stride: int, padding: int
) -> tuple[Array] | None:
  """Backward of max pooling as shifted compares on CPU.

  Each output's gradient goes to the first maximal input of its window in
  row-major order, as XLA's select-and-scatter does; that select-and-scatter
  measured several times slower than this on CPU.
  """
  if not _on_cpu():
    return None
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  padded = jnp.pad(x, pads, constant_values=-jnp.inf)
  out = jax.lax.reduce_window(
    padded,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    "VALID",
  )
  batch, out_h, out_w, channels = out.shape
  padded_h, padded_w = padded.shape[1:3]
  claimed = jnp.zeros(out.shape, bool)
  dpadded = jnp.zeros(padded.shape, x.dtype)
  zero = jnp.zeros((), x.dtype)
  for i in range(window):
    for j in range(window):
      candidate = jax.lax.slice(
        padded,
        (0, i, j, 0),
        (
          batch,
          i + (out_h - 1) * stride + 1,
          j + (out_w - 1) * stride + 1,
          channels,
        ),
        (1, stride, stride, 1),
      )
      chosen = (candidate == out) & ~claimed
      claimed = claimed | chosen
      part = jnp.where(chosen, cotangent, zero)
      high_h = padded_h - i - (out_h - 1) * stride - 1
      high_w = padded_w - j - (out_w - 1) * stride - 1
      dpadded = dpadded + jax.lax.pad(
        part,
        zero,
        (
          (0, 0, 0),
          (i, high_h, stride - 1),
          (j, high_w, stride - 1),
          (0, 0, 0),
        ),
      )
  height, width = x.shape[1:3]
  return (dpadded[:, padding : padding + height, padding : padding + width],)


def _depthwise_conv_as_shifts(
  x: Array,
  kernel: Array,
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
) -> Array:
  """Compute a depthwise conv as a sum of strided slices times weights."""
  kernel_h, kernel_w = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  batch, height, width, channels = x.shape
  out_h = (height - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
  out_w = (width - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
  out = None
  for i in range(kernel_h):
    for j in range(kernel_w):
      top, left = i * dilation[0], j * dilation[1]
      window = jax.lax.slice(
        x,
        (0, top, left, 0),
        (
          batch,
          top + (out_h - 1) * stride[0] + 1,
          left + (out_w - 1) * stride[1] + 1,
          channels,
        ),
        (1, stride[0], stride[1], 1),
      )
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


@compile_per_signature(vjp=_conv2d_vjp)
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
  # XLA's CPU depthwise convolution is slow (measured about 2.7x slower
  # forward and backward than this sum of shifted slices on a 5x5 dilated
  # 32-channel conv at batch 64); dense convolutions stay native.
  depthwise = groups > 1 and groups == x.shape[-1] == kernel.shape[-1]
  if depthwise and _on_cpu():
    return _depthwise_conv_as_shifts(x, kernel, stride, padding, dilation)
  # XLA's CPU 1x1 convolution measured up to 3x slower than the same matmul.
  if groups == 1 and _on_cpu() and _is_pointwise(kernel, stride, padding):
    return jnp.dot(x, kernel[0, 0])
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=stride,
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=_CONV_DIMENSION_NUMBERS,
    feature_group_count=groups,
  )


@compile_per_signature
def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
  """Apply a linear layer `x @ kernel + bias` over the last axis."""
  y = jnp.dot(x, kernel)
  if bias is not None:
    y = y + bias
  return y


@compile_per_signature(vjp=_batch_norm_vjp)
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
  rows = x.reshape(-1, x.shape[-1])
  mean, inv_std = _batch_statistics(rows, epsilon)
  return ((rows - mean) * (inv_std * scale) + bias).reshape(x.shape)


@compile_per_signature
def layer_norm(
  x: Array, scale: Array, bias: Array, *, epsilon: float = NORM_EPSILON
) -> Array:
  """Normalise over the last axis (biased variance), then scale and shift."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + epsilon) * scale + bias


@compile_per_signature(vjp=_max_pool_vjp)
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


@compile_per_signature
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


@compile_per_signature
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


@compile_per_signature
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
