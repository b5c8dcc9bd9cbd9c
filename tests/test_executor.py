"""Tests of the meta-training executor and the per-signature nn_ops."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghn_jax import ghn as ghn_lib
from ghn_jax import nn_ops
from ghn_jax.deepnets1m import Genotype, NetConfig, Network
from ghn_jax.train import compile_count, executor

# A small GHN: the executor does not depend on the GHN's size.
TINY_GHN = ghn_lib.ghn2_config(hid=8, max_shape=(8, 8, 3, 3))
IMAGE_BATCH = 4


def _genotype(op_a: str, op_b: str, input_b: int = 1) -> Genotype:
  return Genotype(
    normal=(("conv_3x3", 0), (op_a, 1), (op_b, input_b), ("skip_connect", 0)),
    normal_concat=(2, 3),
    reduce=(("max_pool_3x3", 0), (op_a, 1), (op_b, 2), ("avg_pool_3x3", 1)),
    reduce_concat=(2, 3),
  )


def _net(op_a: str, op_b: str, input_b: int = 1, cells: int = 2) -> NetConfig:
  return NetConfig(
    genotype=_genotype(op_a, op_b, input_b),
    channels=4,
    num_cells=cells,
    fc_dim=8,
  )


def _images(seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((IMAGE_BATCH, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, IMAGE_BATCH).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


@pytest.fixture(scope="module")
def ghn_variables():
  _, variables = ghn_lib.init_ghn(TINY_GHN, jax.random.PRNGKey(0))
  return variables


def _plain_conv(x, kernel, stride, padding, dilation, groups):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    stride,
    padding,
    rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


@pytest.mark.parametrize(
  "groups, kernel_size, stride, dilation",
  [(1, 3, 1, 1), (1, 1, 2, 1), (6, 3, 2, 1), (6, 5, 1, 2)],
)
def test_conv2d_matches_plain_conv(groups, kernel_size, stride, dilation):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 6)), jnp.float32)
  in_per_group = 6 // groups
  kernel = jnp.asarray(
    rng.standard_normal((kernel_size, kernel_size, in_per_group, 6)),
    jnp.float32,
  )
  pad = dilation * (kernel_size - 1) // 2
  kwargs = dict(
    stride=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    dilation=(dilation, dilation),
    groups=groups,
  )

  def loss(op, x, kernel):
    return jnp.sum(jnp.sin(op(x, kernel)))

  def plain(x, kernel):
    return _plain_conv(x, kernel, *kwargs.values())

  def wrapped(x, kernel):
    return nn_ops.conv2d(x, kernel, **kwargs)

  expected = jax.jit(jax.value_and_grad(loss, (1, 2)), static_argnums=0)(
    plain, x, kernel
  )
  eager = jax.value_and_grad(loss, (1, 2))(wrapped, x, kernel)
  jitted = jax.jit(jax.value_and_grad(loss, (1, 2)), static_argnums=0)(
    wrapped, x, kernel
  )
  for got in (eager, jitted):
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(got[1][0], expected[1][0], atol=1e-4)
    np.testing.assert_allclose(got[1][1], expected[1][1], atol=1e-4)


def test_dense_without_bias_gradient():
  x = jnp.ones((3, 4))
  kernel = jnp.arange(8.0).reshape(4, 2)
  grads = jax.grad(lambda k: jnp.sum(nn_ops.dense(x, k)))(kernel)
  np.testing.assert_allclose(grads, np.full((4, 2), 3.0))
  with_bias = jax.grad(
    lambda b: jnp.sum(nn_ops.dense(x, kernel, b)), allow_int=True
  )(jnp.zeros(2))
  np.testing.assert_allclose(with_bias, [3.0, 3.0])


def test_wrapped_op_compiles_once_per_signature():
  x = jnp.ones((2, 5, 5, 3))
  nn_ops.max_pool(x, window=3, stride=1, padding=1)
  jax.grad(
    lambda x: jnp.sum(nn_ops.max_pool(x, window=3, stride=1, padding=1))
  )(x)
  inputs = [x * 2.0, x * 3.0]
  before = compile_count.compile_count()
  for value in inputs:
    jax.grad(
      lambda x: jnp.sum(nn_ops.max_pool(x, window=3, stride=1, padding=1))
    )(value)
  assert compile_count.compile_count() == before
  nn_ops.max_pool(x, window=3, stride=2, padding=1)
  assert compile_count.compile_count() > before


@pytest.mark.slow
def test_executor_matches_jitted_reference(ghn_variables):
  batch = executor.prepare_meta_batch(
    TINY_GHN, [_net("conv_3x3", "sep_conv_3x3"), _net("cse", "dil_conv_3x3")]
  )
  images, labels = _images()
  loss, logits, grads = executor.meta_value_and_grad(
    TINY_GHN, ghn_variables, batch, images, labels
  )
  ref_loss, ref_logits, ref_grads = executor.reference_value_and_grad(
    TINY_GHN, ghn_variables, batch, images, labels
  )
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  assert len(flat) == len(ref_flat)
  for path, grad in flat:
    scale = float(np.max(np.abs(ref_flat[path]))) + 1e-6
    np.testing.assert_allclose(
      grad / scale, ref_flat[path] / scale, atol=1e-4, err_msg=str(path)
    )
  # The gradient is not trivially zero.
  assert any(float(np.max(np.abs(g))) > 0 for _, g in flat)


def test_prepare_meta_batch_rejects_empty():
  with pytest.raises(ValueError, match="at least one"):
    executor.prepare_meta_batch(TINY_GHN, [])


@pytest.mark.slow
def test_compile_count_stops_growing(ghn_variables):
  """Distinct architectures reuse compiled programs once seen."""
  ops = ("conv_3x3", "sep_conv_3x3", "max_pool_3x3", "skip_connect")
  images, labels = _images()

  def signature(batch):
    shapes = jax.tree_util.tree_map(np.shape, batch.inputs)
    return str(shapes)

  def run(configs):
    batch = executor.prepare_meta_batch(TINY_GHN, configs)
    loss, _, grads = executor.meta_value_and_grad(
      TINY_GHN, ghn_variables, batch, images, labels
    )
    jax.block_until_ready(grads)
    assert np.isfinite(float(loss))
    return signature(batch)

  # Warm up: every op at every position it can take.
  seen = set()
  for op in ops:
    for input_b in (1, 2):
      seen.add(run([_net(op, op, input_b)]))

  # Distinct mixed architectures: no compilation unless a new GHN size
  # bucket appears.
  new_compiles, new_buckets, count = 0, 0, 0
  for op_a in ops:
    for op_b in ops:
      if op_a == op_b:
        continue
      before = compile_count.compile_count()
      key = run([_net(op_a, op_b, 2)])
      count += 1
      if key in seen:
        new_compiles += compile_count.compile_count() - before
      else:
        new_buckets += 1
        seen.add(key)
  assert count == 12
  assert new_compiles == 0
  assert new_buckets < count


def test_assembly_and_cotangent_match_autodiff(ghn_variables):
  """Cutting tensors out and adding their gradients back equals jax.vjp."""
  batch = executor.prepare_meta_batch(
    TINY_GHN, [_net("conv_3x3", "sep_conv_3x3", cells=1)]
  )
  forward_fn, _ = executor.ghn_functions(TINY_GHN)
  outputs = forward_fn(ghn_variables, batch.inputs)
  plans = batch.plans[0]

  got = executor.assemble_network_params(outputs, plans)
  want, vjp_fn = jax.vjp(
    lambda out: ghn_lib.assemble_params(out, plans, jnp), outputs
  )
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
  assert len(got_leaves) == len(want_leaves) > 0
  for path, value in got_leaves:
    np.testing.assert_array_equal(value, want_leaves[path])

  rng = np.random.default_rng(0)
  grads = jax.tree_util.tree_map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), want
  )
  cotangent = executor.outputs_cotangent(outputs, [plans], [grads])
  (expected,) = vjp_fn(grads)
  for (path, value), other in zip(
    jax.tree_util.tree_leaves_with_path(cotangent),
    jax.tree_util.tree_leaves(expected),
    strict=True,
  ):
    np.testing.assert_allclose(value, other, atol=1e-5, err_msg=str(path))


def test_fused_network_equals_unfused():
  # Separable, double (1x7 then 7x1) and plain conv blocks, the stem's
  # conv and batch norm, and the 1x1 preprocessing of each cell.
  config = _net("sep_conv_3x3", "conv_7x1_1x7")
  network = Network(config)
  images, labels = _images()
  params = network.init(jax.random.PRNGKey(1), images)["params"]

  def loss(params):
    logits = network.apply({"params": params}, images)
    return executor.cross_entropy(logits, labels), logits

  calls = []
  block = nn_ops.conv_block.forward_fn

  def count(arrays, static):
    calls.append(static)
    return block(arrays, static)

  nn_ops.conv_block.forward_fn = count
  try:
    (fused_loss, fused_logits), fused_grads = jax.value_and_grad(
      loss, has_aux=True
    )(params)
  finally:
    nn_ops.conv_block.forward_fn = block
  assert calls, "the network ran no fused conv block"
  with nn_ops.unfused():
    (loss_value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(fused_logits, logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(fused_loss, loss_value, rtol=1e-5)
  flat_fused = jax.tree_util.tree_leaves_with_path(fused_grads)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  assert len(flat_fused) == len(flat)
  for path, value in flat_fused:
    np.testing.assert_allclose(
      value, flat[path], rtol=1e-4, atol=1e-5, err_msg=str(path)
    )


def test_compiled_programs_dropped_near_the_map_limit(monkeypatch):
  fn = jax.jit(lambda x: x * 3.0 + 1.0)
  x = jnp.ones(3)
  fn(x)
  monkeypatch.setattr(compile_count, "memory_map_limit", lambda: 100)
  monkeypatch.setattr(compile_count, "memory_map_count", lambda: 69)
  assert not compile_count.release_programs_near_map_limit()
  before = compile_count.compile_count()
  fn(x)
  assert compile_count.compile_count() == before
  monkeypatch.setattr(compile_count, "memory_map_count", lambda: 70)
  assert compile_count.release_programs_near_map_limit()
  np.testing.assert_allclose(fn(x), [4.0, 4.0, 4.0])
  assert compile_count.compile_count() == before + 1


@pytest.mark.skipif(
  compile_count.memory_map_count() is None, reason="needs /proc (Linux)"
)
def test_memory_map_count_grows_with_compiled_programs():
  limit = compile_count.memory_map_limit()
  assert limit is not None and limit > 0
  before = compile_count.memory_map_count()
  for size in range(1, 21):
    jax.jit(lambda x: jnp.sin(x) * 2.0)(jnp.ones(size)).block_until_ready()
  assert compile_count.memory_map_count() > before


def test_fused_network_reports_wrong_kernel_shape():
  config = _net("sep_conv_3x3", "conv_3x3")
  network = Network(config)
  images, _ = _images()
  params = network.init(jax.random.PRNGKey(1), images)["params"]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  path = next(p for p in flat if p.endswith("pointwise1/kernel"))
  flat[path] = jnp.zeros(flat[path].shape[:-1] + (flat[path].shape[-1] + 1,))
  broken = flax.traverse_util.unflatten_dict(flat, sep="/")
  with pytest.raises(flax.errors.ScopeParamShapeError, match="pointwise1"):
    network.apply({"params": broken}, images)
