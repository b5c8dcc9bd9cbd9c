"""Tests of the pure network ops against plain NumPy references."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from ghn_jax import nn_ops

RTOL = 1e-5
ATOL = 1e-5


def _rng(seed=0):
  return np.random.default_rng(seed)


def _numpy_conv(x, kernel, stride, padding, dilation, groups):
  """Direct NHWC/HWIO convolution by loops over output positions."""
  batch, height, width, channels = x.shape
  kh, kw, in_per_group, out = kernel.shape
  (pt, pb), (pl, pr) = padding
  x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  span_h = dilation[0] * (kh - 1) + 1
  span_w = dilation[1] * (kw - 1) + 1
  out_h = (x.shape[1] - span_h) // stride[0] + 1
  out_w = (x.shape[2] - span_w) // stride[1] + 1
  out_per_group = out // groups
  y = np.zeros((batch, out_h, out_w, out))
  for i in range(out_h):
    for j in range(out_w):
      top, left = i * stride[0], j * stride[1]
      patch = x[
        :,
        top : top + span_h : dilation[0],
        left : left + span_w : dilation[1],
        :,
      ]
      for g in range(groups):
        xs = patch[..., g * in_per_group : (g + 1) * in_per_group]
        ks = kernel[..., g * out_per_group : (g + 1) * out_per_group]
        y[:, i, j, g * out_per_group : (g + 1) * out_per_group] = np.einsum(
          "bhwc,hwco->bo", xs, ks
        )
  return y


CONV_CASES = [
  # (in_channels, out, kernel, stride, padding, dilation, groups)
  (3, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
  (4, 6, (5, 5), (2, 2), ((2, 2), (2, 2)), (1, 1), 1),
  (4, 4, (3, 3), (2, 2), ((2, 2), (2, 2)), (2, 2), 4),
  (4, 4, (1, 7), (1, 2), ((0, 0), (3, 3)), (1, 1), 1),
  (6, 2, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 2),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_loops(case, jit):
  cin, cout, kernel_size, stride, padding, dilation, groups = case
  rng = _rng()
  x = rng.standard_normal((2, 9, 8, cin)).astype(np.float32)
  kernel = rng.standard_normal((*kernel_size, cin // groups, cout)).astype(
    np.float32
  )
  fn = functools.partial(
    nn_ops.conv2d,
    stride=stride,
    padding=padding,
    dilation=dilation,
    groups=groups,
  )
  if jit:
    fn = jax.jit(fn)
  y = fn(x, kernel)
  expected = _numpy_conv(x, kernel, stride, padding, dilation, groups)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_conv2d_one_pixel_input():
  x = np.ones((1, 1, 1, 2), np.float32)
  kernel = np.ones((3, 3, 2, 5), np.float32)
  y = nn_ops.conv2d(x, kernel, padding=((1, 1), (1, 1)))
  # Only the kernel centre overlaps the single pixel: 2 channels * 1.
  np.testing.assert_allclose(y, np.full((1, 1, 1, 5), 2.0))


def test_dense_with_and_without_bias():
  rng = _rng(1)
  x = rng.standard_normal((3, 4)).astype(np.float32)
  kernel = rng.standard_normal((4, 5)).astype(np.float32)
  bias = rng.standard_normal(5).astype(np.float32)
  np.testing.assert_allclose(
    nn_ops.dense(x, kernel, bias), x @ kernel + bias, rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
    nn_ops.dense(x, kernel), x @ kernel, rtol=RTOL, atol=ATOL
  )


@pytest.mark.parametrize("jit", [False, True])
def test_batch_norm_uses_biased_batch_variance(jit):
  rng = _rng(2)
  x = rng.standard_normal((4, 3, 3, 5)).astype(np.float32) * 3 + 1
  scale = rng.standard_normal(5).astype(np.float32)
  bias = rng.standard_normal(5).astype(np.float32)
  fn = jax.jit(nn_ops.batch_norm) if jit else nn_ops.batch_norm
  y = fn(x, scale, bias)
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))  # ddof=0: biased
  expected = (x - mean) / np.sqrt(var + nn_ops.NORM_EPSILON) * scale + bias
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_batch_norm_single_value_is_bias():
  x = np.full((1, 1, 1, 3), 7.0, np.float32)
  y = nn_ops.batch_norm(x, np.ones(3, np.float32), np.arange(3.0))
  np.testing.assert_allclose(y, np.arange(3.0).reshape(1, 1, 1, 3))


def test_layer_norm_matches_numpy():
  rng = _rng(3)
  x = rng.standard_normal((2, 6, 8)).astype(np.float32)
  scale = rng.standard_normal(8).astype(np.float32)
  bias = rng.standard_normal(8).astype(np.float32)
  y = nn_ops.layer_norm(x, scale, bias)
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  expected = (x - mean) / np.sqrt(var + nn_ops.NORM_EPSILON) * scale + bias
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_max_pool_ignores_padding_for_negative_inputs():
  x = -np.arange(1.0, 17.0, dtype=np.float32).reshape(1, 4, 4, 1)
  y = nn_ops.max_pool(x, window=3, stride=2, padding=1)
  assert y.shape == (1, 2, 2, 1)
  # Top-left window covers rows/cols 0..1: max is -1 (not the 0 padding).
  np.testing.assert_allclose(y[0, :, :, 0], [[-1.0, -2.0], [-5.0, -6.0]])


def test_avg_pool_excludes_padding_from_count():
  x = np.arange(16.0, dtype=np.float32).reshape(1, 4, 4, 1)
  y = nn_ops.avg_pool(x, window=3, stride=1, padding=1)
  # Corner: mean of the 2x2 block {0, 1, 4, 5}; centre: mean of 9 values.
  assert float(y[0, 0, 0, 0]) == pytest.approx(2.5)
  assert float(y[0, 1, 1, 0]) == pytest.approx(5.0)


def test_global_avg_pool_and_flatten_order():
  x = np.arange(24.0, dtype=np.float32).reshape(1, 2, 3, 4)
  np.testing.assert_allclose(nn_ops.global_avg_pool(x), x.mean(axis=(1, 2)))
  flat = nn_ops.flatten_channels_first(x)
  np.testing.assert_allclose(flat, np.transpose(x, (0, 3, 1, 2)).reshape(1, -1))


def test_subsample_with_offset():
  x = np.arange(25.0).reshape(1, 5, 5, 1)
  np.testing.assert_array_equal(
    nn_ops.subsample(x, stride=2), x[:, ::2, ::2, :]
  )
  np.testing.assert_array_equal(
    nn_ops.subsample(x, stride=2, offset=1), x[:, 1::2, 1::2, :]
  )
  assert nn_ops.subsample(x, stride=1) is x


def test_hard_swish_matches_definition():
  x = np.linspace(-5, 5, 41).astype(np.float32)
  expected = x * np.clip(x + 3, 0, 6) / 6
  np.testing.assert_allclose(nn_ops.hard_swish(x), expected, atol=1e-6)


def test_gelu_is_exact_erf_form():
  from scipy import special

  x = np.linspace(-4, 4, 17).astype(np.float32)
  expected = 0.5 * x * (1 + special.erf(x / np.sqrt(2)))
  np.testing.assert_allclose(nn_ops.gelu(x), expected, atol=1e-6)


def _numpy_attention(qkv, num_heads):
  batch, tokens, width = qkv.shape
  inner = width // 3
  head_dim = inner // num_heads
  q, k, v = qkv[..., :inner], qkv[..., inner : 2 * inner], qkv[..., 2 * inner :]
  out = np.zeros((batch, tokens, inner))
  for h in range(num_heads):
    sl = slice(h * head_dim, (h + 1) * head_dim)
    logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / np.sqrt(head_dim)
    logits -= logits.max(-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(-1, keepdims=True)
    out[..., sl] = weights @ v[..., sl]
  return out


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("tokens", [1, 5])
def test_attention_matches_per_head_softmax(tokens, jit):
  qkv = _rng(4).standard_normal((2, tokens, 3 * 16)).astype(np.float32)
  fn = functools.partial(nn_ops.attention, num_heads=8)
  if jit:
    fn = jax.jit(fn)
  np.testing.assert_allclose(
    fn(qkv), _numpy_attention(qkv, 8), rtol=1e-4, atol=1e-5
  )


def test_tokens_round_trip_and_channel_gate():
  x = _rng(5).standard_normal((2, 3, 4, 5)).astype(np.float32)
  tokens = nn_ops.image_to_tokens(x)
  assert tokens.shape == (2, 12, 5)
  np.testing.assert_array_equal(
    nn_ops.tokens_to_image(tokens, height=3, width=4), x
  )
  gate = np.arange(10.0, dtype=np.float32).reshape(2, 5)
  np.testing.assert_allclose(
    nn_ops.scale_channels(x, gate), x * gate[:, None, None, :]
  )


def test_concatenate_and_zeros_like():
  a = np.ones((1, 2, 2, 3), np.float32)
  b = np.zeros((1, 2, 2, 1), np.float32)
  assert nn_ops.concatenate((a,)) is a
  assert nn_ops.concatenate((a, b)).shape == (1, 2, 2, 4)
  zeros = nn_ops.zeros_like(a)
  assert zeros.shape == a.shape
  assert float(np.abs(zeros).sum()) == 0.0


def test_dropout_keeps_expectation():
  x = np.ones((20_000,), np.float32)
  y = np.asarray(nn_ops.dropout(x, jax.random.key(0), rate=0.5))
  assert set(np.unique(y)) <= {0.0, 2.0}
  assert abs(y.mean() - 1.0) < 0.05
