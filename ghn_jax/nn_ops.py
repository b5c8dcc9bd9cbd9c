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

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

# Epsilon of PyTorch's BatchNorm2d and LayerNorm, which the original networks
# use with their default settings.
NORM_EPSILON = 1e-5
_CONV_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# Whether modules may run a chain of ops as one fused op (`conv_block`).
_FUSION = contextvars.ContextVar("ghn_jax_nn_ops_fusion", default=True)


def fusion_enabled() -> bool:
  """Return whether modules may call fused ops such as `conv_block`."""
  return _FUSION.get()


@contextlib.contextmanager
def unfused() -> Iterator[None]:
  """Make modules call one op per step inside the block.

  Fusion changes no result. Code that follows module calls or replaces an
  op needs the separate steps: graph tracing, and running batch statistics
  at evaluation.
  """
  token = _FUSION.set(False)
  try:
    yield
  finally:
    _FUSION.reset(token)


class ConvSpec(NamedTuple):
  """Static settings of a conv inside `conv_block` (see `conv2d`)."""

  stride: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  dilation: tuple[int, int] = (1, 1)
  groups: int = 1


# A 1x1 conv with stride 1 and no padding.
POINTWISE = ConvSpec()


def _bind_arguments(signature, static_names, args, kwargs):
  """Split a call's arguments into arrays (positional) and static pairs."""
  bound = signature.bind(*args, **kwargs)
  bound.apply_defaults()
  arrays = tuple(
    value for name, value in bound.arguments.items() if name not in static_names
  )
  static = tuple((name, bound.arguments[name]) for name in static_names)
  return arrays, static


def _compiled_op(
  fn: Callable[..., Array],
  forward: Callable[..., tuple[Array, tuple]],
  backward: Callable[..., tuple],
) -> Callable[..., Array]:
  """Make an op from a jittable forward and backward (see callers).

  `forward(arrays, static)` returns `(out, residuals)` and
  `backward(arrays, static, residuals, cotangent)` one cotangent per
  array. Both are jitted with `static` as a static argument, and the
  backward is also keyed on `wrt`, the arrays whose cotangent is needed.
  The others come back as None, so XLA drops their computation (for
  example the gradient of the input images of a network's first conv).
  """
  signature = inspect.signature(fn)
  static_names = tuple(
    name
    for name, parameter in signature.parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
  )

  @functools.partial(jax.jit, static_argnums=1)
  def forward_fn(arrays, static):
    return forward(arrays, static)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def backward_fn(arrays, static, wrt, residuals, cotangent):
    cotangents = backward(arrays, static, residuals, cotangent)
    return tuple(
      c if needed else None for c, needed in zip(cotangents, wrt, strict=True)
    )

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def differentiable(static, arrays):
    return wrapped.forward_fn(arrays, static)[0]

  def differentiable_fwd(static, arrays):
    values = tuple(None if a is None else a.value for a in arrays)
    # Which arrays need a cotangent travels in the residuals' structure.
    wrt = tuple(() if a is not None and a.perturbed else None for a in arrays)
    out, residuals = wrapped.forward_fn(values, static)
    return out, (values, residuals, wrt)

  def differentiable_bwd(static, saved, cotangent):
    values, residuals, wrt = saved
    needed = tuple(w is not None for w in wrt)
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
      return (tuple(None for _ in values),)
    return (wrapped.backward_fn(values, static, needed, residuals, cotangent),)

  differentiable.defvjp(
    differentiable_fwd, differentiable_bwd, symbolic_zeros=True
  )

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    arrays, static = _bind_arguments(signature, static_names, args, kwargs)
    return differentiable(static, arrays)

  wrapped.forward_fn = forward_fn
  wrapped.backward_fn = backward_fn
  return wrapped


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
  Cotangents of inputs that are not differentiated (constants, images) are
  not computed.

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

  def forward(arrays, static):
    return fn(*arrays, **dict(static)), ()

  def backward(arrays, static, residuals, cotangent):
    del residuals
    if vjp is not None:
      cotangents = vjp(*arrays, cotangent, **dict(static))
      if cotangents is not None:
        return tuple(cotangents)
    _, vjp_fn = jax.vjp(lambda *a: fn(*a, **dict(static)), *arrays)
    return vjp_fn(cotangent)

  return _compiled_op(fn, forward, backward)


def compile_with_residuals(
  fn: Callable[..., tuple[Array, tuple[Array, ...]]] | None = None,
  *,
  vjp: Callable[..., tuple],
) -> Callable[..., Array]:
  """Like `compile_per_signature`, for an op that saves intermediates.

  Used as `@compile_with_residuals(vjp=rule)`.

  Args:
    fn: the op, returning `(out, residuals)`: a tuple of intermediate
      arrays that the backward reads instead of recomputing them. The
      wrapped op returns `out` only.
    vjp: the backward, `vjp(*arrays, residuals, cotangent, **static)`,
      returning one cotangent per array argument (None for a None one).

  Returns:
    The wrapped op.
  """

  if fn is None:
    return functools.partial(compile_with_residuals, vjp=vjp)

  def forward(arrays, static):
    return fn(*arrays, **dict(static))

  def backward(arrays, static, residuals, cotangent):
    return tuple(vjp(*arrays, residuals, cotangent, **dict(static)))

  return _compiled_op(fn, forward, backward)


def _on_cpu() -> bool:
  """Return whether arrays live on the CPU, where hand-written kernels apply."""
  return jax.default_backend() == "cpu"


def _contract_rows(a: Array, b: Array) -> Array:
  """Return `a.T @ b` for 2-D `a` (M, P) and `b` (M, Q): (P, Q)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _is_depthwise(x: Array, kernel: Array, groups: int) -> bool:
  """Return whether a conv has one filter per channel (depthwise)."""
  return groups > 1 and groups == x.shape[-1] == kernel.shape[-1]


def _is_pointwise(
  kernel: Array, stride: tuple[int, int], padding: Padding
) -> bool:
  """Return whether a dense conv is 1x1, stride 1 and unpadded (a matmul)."""
  return (
    kernel.shape[:2] == (1, 1)
    and stride == (1, 1)
    and padding == ((0, 0), (0, 0))
  )


# Rows times channels of the batch chunk that the depthwise kernel gradient
# reduces at a time (see `_depthwise_kernel_grad`).
_DEPTHWISE_CHUNK_ELEMENTS = 65536


def _window(
  x: Array,
  top: int,
  left: int,
  out_hw: tuple[int, int],
  stride: tuple[int, int],
) -> Array:
  """Strided NHWC window of `x` from (top, left) with `out_hw` positions."""
  batch, _, _, channels = x.shape
  return jax.lax.slice(
    x,
    (0, top, left, 0),
    (
      batch,
      top + (out_hw[0] - 1) * stride[0] + 1,
      left + (out_hw[1] - 1) * stride[1] + 1,
      channels,
    ),
    (1, stride[0], stride[1], 1),
  )


def _batch_chunk(batch: int, largest: int) -> int:
  """Largest power of two up to `largest` that divides `batch`."""
  chunk = 1
  while 2 * chunk <= largest and batch % (2 * chunk) == 0:
    chunk *= 2
  return chunk


def _kernel_grad_by_chunks(
  x: Array,
  cotangent: Array,
  kernel_hw: tuple[int, int],
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
  chunk: int,
  contract: Callable[[Array, Array], Array],
) -> Array:
  """Sum `contract(window rows, cotangent rows)` over taps and batch chunks.

  For each kernel tap, `contract` gets the input window and the cotangent
  of `chunk` images as rows, (R, in_channels) and (R, out_channels), and
  returns that chunk's gradient of the tap. A `lax.scan` over the chunks
  keeps each chunk's data in cache while all taps read it.

  Returns:
    The gradients stacked over taps in row-major order.
  """
  batch, out_h, out_w, out_channels = cotangent.shape
  padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  padded = padded.reshape(batch // chunk, chunk, *padded.shape[1:])
  rows = cotangent.reshape(batch // chunk, -1, out_channels)

  def add_chunk(total, pair):
    x_chunk, g_rows = pair
    taps = []
    for i in range(kernel_hw[0]):
      for j in range(kernel_hw[1]):
        window = _window(
          x_chunk, i * dilation[0], j * dilation[1], (out_h, out_w), stride
        )
        taps.append(contract(window.reshape(g_rows.shape[0], -1), g_rows))
    return total + jnp.stack(taps), None

  tap_shape = jax.eval_shape(
    contract,
    jax.ShapeDtypeStruct((rows.shape[1], x.shape[-1]), x.dtype),
    jax.ShapeDtypeStruct(rows.shape[1:], x.dtype),
  ).shape
  initial = jnp.zeros((kernel_hw[0] * kernel_hw[1], *tap_shape), x.dtype)
  total, _ = jax.lax.scan(add_chunk, initial, (padded, rows))
  return total


def _depthwise_kernel_grad(
  x: Array,
  cotangent: Array,
  kernel_hw: tuple[int, int],
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
) -> Array:
  """Kernel gradient of a depthwise conv, a few images at a time.

  Each kernel tap's gradient is a sum over batch and positions of a
  window of the input times the cotangent. Over the whole batch those
  sums were 3-5x slower on CPU than over chunks of images small enough to
  stay in cache, each sum a matmul with ones (see `_channel_sums`).
  """
  batch, out_h, out_w, channels = cotangent.shape
  chunk = _batch_chunk(
    batch, max(1, _DEPTHWISE_CHUNK_ELEMENTS // (out_h * out_w * channels))
  )

  def contract(window, g_rows):
    return _channel_sums(window * g_rows)

  total = _kernel_grad_by_chunks(
    x, cotangent, kernel_hw, stride, padding, dilation, chunk, contract
  )
  return total.reshape(*kernel_hw, 1, channels)


def _uses_chunked_kernel_grad(x: Array, kernel: Array) -> bool:
  """Return whether a dense conv's kernel gradient is faster by chunks.

  On CPU, XLA's kernel gradient of a KxK conv measured 3-5x slower than
  `_dense_kernel_grad` on 32x32 inputs with 80 or more channels. It was
  also slower on inputs with a few channels (the images a network's first
  conv reads). Elsewhere it was as fast or faster.
  """
  in_channels = kernel.shape[2]
  large = x.shape[1] * x.shape[2] >= 1024 and in_channels >= 80
  return large or in_channels <= 4


def _dense_kernel_grad(
  x: Array,
  cotangent: Array,
  kernel_hw: tuple[int, int],
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
) -> Array:
  """Kernel gradient of a dense conv: one matmul per tap, by batch chunks."""
  chunk = _batch_chunk(x.shape[0], 4)
  total = _kernel_grad_by_chunks(
    x, cotangent, kernel_hw, stride, padding, dilation, chunk, _contract_rows
  )
  return total.reshape(*kernel_hw, x.shape[-1], cotangent.shape[-1])


def _depthwise_vjp(
  x: Array,
  kernel: Array,
  cotangent: Array,
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
) -> tuple[Array, Array]:
  """Backward of `_depthwise_conv_as_shifts` (input and kernel).

  The input gradient is the same sum of shifted slices over the cotangent,
  spread out by the stride and with the kernel flipped.
  """
  kernel_h, kernel_w = kernel.shape[:2]
  height, width = x.shape[1:3]
  out_h, out_w = cotangent.shape[1:3]
  spread_h = (out_h - 1) * stride[0] + 1
  spread_w = (out_w - 1) * stride[1] + 1
  low_h = dilation[0] * (kernel_h - 1) - padding[0][0]
  low_w = dilation[1] * (kernel_w - 1) - padding[1][0]
  zero = jnp.zeros((), cotangent.dtype)
  spread = jax.lax.pad(
    cotangent,
    zero,
    (
      (0, 0, 0),
      (low_h, height - spread_h + padding[0][0], stride[0] - 1),
      (low_w, width - spread_w + padding[1][0], stride[1] - 1),
      (0, 0, 0),
    ),
  )
  dx = _depthwise_conv_as_shifts(
    spread, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)), dilation
  )
  dkernel = _depthwise_kernel_grad(
    x, cotangent, (kernel_h, kernel_w), stride, padding, dilation
  )
  return dx, dkernel


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
  """Backward of a 1x1 or depthwise conv on CPU; None otherwise.

  XLA's CPU gradient program for a 1x1 convolution measured 5-10x slower
  than the two matmuls it amounts to (batch 64, 32x32, 32-240 channels).
  A depthwise conv (computed as shifted slices) gets `_depthwise_vjp`.
  A dense KxK conv keeps XLA's gradient except for the kernel gradient in
  the cases of `_uses_chunked_kernel_grad`.
  """
  if not _on_cpu():
    return None
  if _is_depthwise(x, kernel, groups):
    return _depthwise_vjp(x, kernel, cotangent, stride, padding, dilation)
  if groups != 1:
    return None
  if not _is_pointwise(kernel, stride, padding):
    if not _uses_chunked_kernel_grad(x, kernel):
      return None
    _, vjp_fn = jax.vjp(
      lambda a: _conv2d_impl(a, kernel, stride, padding, dilation, groups), x
    )
    dkernel = _dense_kernel_grad(
      x, cotangent, kernel.shape[:2], stride, padding, dilation
    )
    return vjp_fn(cotangent)[0], dkernel
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


def _conv2d_impl(
  x: Array,
  kernel: Array,
  stride: tuple[int, int],
  padding: Padding,
  dilation: tuple[int, int],
  groups: int,
) -> Array:
  """Compute `conv2d` (a traceable function, not compiled on its own)."""
  # XLA's CPU depthwise convolution measured about 2.7x slower forward and
  # backward than this sum of shifted slices (5x5 dilated, 32 channels,
  # batch 64). Dense convolutions stay native.
  if _is_depthwise(x, kernel, groups) and _on_cpu():
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


def _conv2d_backward(
  x: Array, kernel: Array, cotangent: Array, spec: ConvSpec
) -> tuple[Array, Array]:
  """Cotangents of a conv's input and kernel (traceable)."""
  spec = ConvSpec(*spec)
  cotangents = _conv2d_vjp(x, kernel, cotangent, **spec._asdict())
  if cotangents is not None:
    return cotangents
  _, vjp_fn = jax.vjp(lambda a, k: _conv2d_impl(a, k, *spec), x, kernel)
  return vjp_fn(cotangent)


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
  return _conv2d_impl(x, kernel, stride, padding, dilation, groups)


def _conv_block_vjp(
  x: Array,
  kernel: Array,
  kernel2: Array | None,
  scale: Array | None,
  bias: Array | None,
  residuals: tuple[Array, ...],
  cotangent: Array,
  *,
  relu: bool,
  conv: ConvSpec,
  conv2: ConvSpec,
  epsilon: float,
) -> tuple[Array | None, ...]:
  """Backward of `conv_block`, stage by stage from the saved conv outputs."""
  residuals = list(residuals)
  g = cotangent
  dkernel2 = dscale = dbias = None
  if scale is not None:
    g, dscale, dbias = _batch_norm_vjp(
      residuals.pop(), scale, bias, g, epsilon=epsilon
    )
  if kernel2 is not None:
    g, dkernel2 = _conv2d_backward(residuals.pop(), kernel2, g, conv2)
  h = jax.nn.relu(x) if relu else x
  dx, dkernel = _conv2d_backward(h, kernel, g, conv)
  if relu:
    dx = jnp.where(x > 0, dx, jnp.zeros((), dx.dtype))
  return dx, dkernel, dkernel2, dscale, dbias


@compile_with_residuals(vjp=_conv_block_vjp)
def conv_block(
  x: Array,
  kernel: Array,
  kernel2: Array | None = None,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  relu: bool = False,
  conv: ConvSpec = POINTWISE,
  conv2: ConvSpec = POINTWISE,
  epsilon: float = NORM_EPSILON,
) -> tuple[Array, tuple[Array, ...]]:
  """Apply ReLU (optional), one or two convs and batch norm (optional).

  One compiled program per signature for the whole block, forward and
  backward: it equals `batch_norm(conv2d(conv2d(relu(x), kernel), kernel2),
  scale, bias)` with each step present only when asked for, but saves the
  separate dispatches, the memory passes of the ReLU and the recomputation
  of the conv outputs in the backward.

  Args:
    x: input, (batch, height, width, in_channels).
    kernel: HWIO kernel of the first conv.
    kernel2: HWIO kernel of an optional second conv.
    scale: batch-norm scale, or None for no batch norm.
    bias: batch-norm bias (with `scale`).
    relu: apply ReLU to `x` first.
    conv: stride, padding, dilation and groups of the first conv.
    conv2: the same for the second conv.
    epsilon: added to the batch-norm variance.

  Returns:
    The block's output. (The undecorated function also returns the conv
    outputs that the backward reads.)

  Raises:
    ValueError: if only one of `scale` and `bias` is given.
  """
  if (scale is None) != (bias is None):
    raise ValueError(
      "conv_block got only one of scale and bias; pass both for batch norm "
      "or neither."
    )
  h = jax.nn.relu(x) if relu else x
  out = _conv2d_impl(h, kernel, *conv)
  residuals = []
  if kernel2 is not None:
    residuals.append(out)
    out = _conv2d_impl(out, kernel2, *conv2)
  if scale is not None:
    residuals.append(out)
    rows = out.reshape(-1, out.shape[-1])
    mean, inv_std = _batch_statistics(rows, epsilon)
    out = ((rows - mean) * (inv_std * scale) + bias).reshape(out.shape)
  return out, tuple(residuals)


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
