"""Hand-written backward rules of `nn_ops` against `jax.grad` of plain ops.

Each wrapped op's `__wrapped__` is the plain function; its autodiff is the
reference for the compiled forward/backward pair, eagerly and under `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghn_jax import nn_ops

RTOL = 1e-4
ATOL = 1e-4


def _rng(seed=0):
  return np.random.default_rng(seed)


def _grads(fn, arrays, weights, jit):
  """Gradients of `sum(fn(*arrays) * weights)` w.r.t. every array."""

  def loss(*a):
    return jnp.sum(fn(*a) * weights)

  grad_fn = jax.grad(loss, argnums=tuple(range(len(arrays))))
  if jit:
    grad_fn = jax.jit(grad_fn)
  return grad_fn(*arrays)


def _check_against_plain(op, arrays, jit, plain=None, **static):
  """Assert the wrapped op's value and gradients equal the plain op's."""
  plain = op.__wrapped__ if plain is None else plain
  expected = plain(*arrays, **static)
  got = op(*arrays, **static)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
  weights = jnp.asarray(_rng(1).standard_normal(expected.shape), jnp.float32)
  want = _grads(lambda *a: plain(*a, **static), arrays, weights, jit)
  have = _grads(lambda *a: op(*a, **static), arrays, weights, jit)
  assert len(have) == len(want)
  for h, w in zip(have, want, strict=True):
    assert h.shape == w.shape
    np.testing.assert_allclose(h, w, rtol=RTOL, atol=ATOL)


CONV_CASES = [
  # (x shape, kernel shape, stride, padding, dilation, groups)
  ((2, 5, 5, 3), (1, 1, 3, 4), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
  ((1, 1, 1, 2), (1, 1, 2, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
  ((2, 6, 6, 2), (1, 1, 2, 3), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),
  ((2, 6, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
  ((2, 7, 7, 2), (5, 5, 2, 3), (1, 1), ((4, 4), (4, 4)), (2, 2), 1),
  ((2, 8, 8, 3), (7, 7, 3, 2), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),
  ((1, 5, 6, 2), (3, 3, 2, 2), (2, 1), ((0, 1), (1, 0)), (1, 1), 1),
  ((2, 6, 6, 4), (3, 3, 1, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),
  # Depthwise, strided and dilated, over several batch chunks.
  ((8, 9, 9, 3), (5, 5, 1, 3), (2, 2), ((4, 4), (4, 4)), (2, 2), 3),
  ((3, 7, 8, 2), (3, 3, 1, 2), (1, 2), ((1, 0), (2, 1)), (1, 1), 2),
  # Kernel gradient by batch chunks: many channels at 32x32, and images.
  ((2, 32, 32, 80), (3, 3, 80, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
  ((8, 9, 9, 3), (3, 3, 3, 5), (2, 2), ((2, 1), (1, 2)), (2, 1), 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_conv2d_gradients_match_autodiff(case, jit):
  x_shape, k_shape, stride, padding, dilation, groups = case
  rng = _rng()
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  _check_against_plain(
    nn_ops.conv2d,
    (x, kernel),
    jit,
    stride=stride,
    padding=padding,
    dilation=dilation,
    groups=groups,
  )


@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (1, 1, 2, 3), (2, 4, 4, 1)])
@pytest.mark.parametrize("jit", [False, True])
def test_batch_norm_gradients_match_autodiff(shape, jit):
  rng = _rng(2)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.standard_normal(shape[-1:]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1:]), jnp.float32)
  _check_against_plain(
    nn_ops.batch_norm, (x, scale, bias), jit, plain=_plain_batch_norm
  )


def _plain_batch_norm(x, scale, bias):
  """Batch norm with batch statistics written with plain reductions."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  variance = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) / jnp.sqrt(variance + nn_ops.NORM_EPSILON) * scale + bias


POOL_CASES = [(3, 1, 1), (3, 2, 1), (2, 2, 0), (1, 1, 0), (3, 2, 0)]


@pytest.mark.parametrize("window,stride,padding", POOL_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_max_pool_gradients_match_autodiff(window, stride, padding, jit):
  rng = _rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
  _check_against_plain(
    nn_ops.max_pool,
    (x,),
    jit,
    window=window,
    stride=stride,
    padding=padding,
  )


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_ties(stride):
  # Many exact ties (relu zeros, repeated values): every output's gradient
  # must go to one input only, the first maximum of its window.
  rng = _rng(4)
  x = np.maximum(rng.integers(-2, 2, (2, 6, 6, 2)), 0).astype(np.float32)
  _check_against_plain(
    nn_ops.max_pool,
    (jnp.asarray(x),),
    False,
    window=3,
    stride=stride,
    padding=1,
  )
  ones = jnp.ones((2, 6, 6, 2), jnp.float32)
  grad = jax.grad(
    lambda a: jnp.sum(nn_ops.max_pool(a, window=3, stride=stride, padding=1))
  )(ones)
  num_outputs = nn_ops.max_pool(ones, window=3, stride=stride, padding=1).size
  assert float(jnp.sum(grad)) == num_outputs


def _conv_block_plain(x, kernel, kernel2, scale, bias, relu, conv, conv2):
  """`conv_block` as separate wrapped ops."""
  h = nn_ops.relu(x) if relu else x
  h = nn_ops.conv2d(h, kernel, **conv._asdict())
  if kernel2 is not None:
    h = nn_ops.conv2d(h, kernel2, **conv2._asdict())
  if scale is not None:
    h = nn_ops.batch_norm(h, scale, bias)
  return h


BLOCK_CASES = [
  # (relu, first conv, kernel shape, second conv kernel shape, batch norm)
  (True, nn_ops.ConvSpec((1, 1), ((1, 1), (1, 1))), (3, 3, 4, 5), None, True),
  (False, nn_ops.ConvSpec((2, 2), ((2, 2), (2, 2))), (5, 5, 4, 3), None, True),
  (True, nn_ops.POINTWISE, (1, 1, 4, 6), None, False),
  (
    True,
    nn_ops.ConvSpec((2, 2), ((2, 2), (2, 2)), (2, 2), 4),
    (3, 3, 1, 4),
    (1, 1, 4, 6),
    True,
  ),
  (
    True,
    nn_ops.ConvSpec((1, 2), ((0, 0), (1, 1))),
    (1, 3, 4, 4),
    (3, 1, 4, 5),
    True,
  ),
]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_conv_block_equals_separate_ops(case, jit):
  relu, conv, k_shape, k2_shape, norm = case
  rng = _rng(2)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  arrays = [x, kernel]
  conv2 = nn_ops.POINTWISE
  if k2_shape is not None:
    arrays.append(jnp.asarray(rng.standard_normal(k2_shape), jnp.float32))
    if k2_shape[:2] == (3, 1):
      conv2 = nn_ops.ConvSpec((2, 1), ((1, 1), (0, 0)))
  channels = (k2_shape or k_shape)[-1]
  if norm:
    arrays.append(jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32))
    arrays.append(jnp.asarray(rng.standard_normal(channels), jnp.float32))

  def split(arrays):
    kernel2 = arrays[2] if k2_shape is not None else None
    scale, bias = (arrays[-2], arrays[-1]) if norm else (None, None)
    return arrays[0], arrays[1], kernel2, scale, bias

  def fused(*a):
    return nn_ops.conv_block(*split(a), relu=relu, conv=conv, conv2=conv2)

  def plain(*a):
    return _conv_block_plain(*split(a), relu, conv, conv2)

  _check_against_plain(fused, tuple(arrays), jit, plain=plain)


def test_conv_block_needs_scale_and_bias_together():
  x = jnp.ones((1, 4, 4, 2))
  kernel = jnp.ones((1, 1, 2, 2))
  with pytest.raises(ValueError, match="only one of scale and bias"):
    nn_ops.conv_block(x, kernel, scale=jnp.ones(2))


def test_backward_skips_inputs_that_are_not_differentiated(monkeypatch):
  rng = _rng(3)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  backward = nn_ops.conv2d.backward_fn
  requested = []

  def spy(arrays, static, wrt, residuals, cotangent):
    requested.append(wrt)
    return backward(arrays, static, wrt, residuals, cotangent)

  monkeypatch.setattr(nn_ops.conv2d, "backward_fn", spy)

  def loss(x, kernel):
    return jnp.sum(jnp.sin(nn_ops.conv2d(x, kernel)))

  def plain_loss(x, kernel):
    return jnp.sum(jnp.sin(nn_ops.conv2d.__wrapped__(x, kernel)))

  got = jax.grad(loss, argnums=1)(x, kernel)
  assert requested == [(False, True)]
  want = jax.grad(plain_loss, argnums=1)(x, kernel)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  jax.grad(loss, argnums=(0, 1))(x, kernel)
  assert requested[-1] == (True, True)
