"""Tests of the growing padding of GHN inputs."""

import jax
import numpy as np

from ghn_jax import ghn as ghn_lib
from ghn_jax.deepnets1m import Genotype, NetConfig
from ghn_jax.train import executor, padding

TINY_GHN = ghn_lib.ghn2_config(hid=8, max_shape=(8, 8, 3, 3))


def _net(op: str, cells: int) -> NetConfig:
  genotype = Genotype(
    normal=((op, 0), ("skip_connect", 1)),
    normal_concat=(2,),
    reduce=(("max_pool_3x3", 0), (op, 1)),
    reduce_concat=(2,),
  )
  return NetConfig(genotype=genotype, channels=8, num_cells=cells, fc_dim=8)


def _shapes(inputs):
  return jax.tree_util.tree_map(np.shape, inputs)


def test_padding_sizes_only_grow():
  padder = padding.GrowingPadder()
  large = executor.prepare_meta_batch(TINY_GHN, [_net("conv_3x3", 5)] * 2)
  small = executor.prepare_meta_batch(TINY_GHN, [_net("conv_1x1", 2)])
  padded_large = padder.pad(large.inputs)
  padded_small = padder.pad(small.inputs)
  assert _shapes(padded_small) == _shapes(padded_large)
  for size in padder.sizes.values():
    assert size & (size - 1) == 0  # a power of two


def test_padding_keeps_blocks_seen_before():
  padder = padding.GrowingPadder()
  first = padder.pad(
    executor.prepare_meta_batch(TINY_GHN, [_net("conv_3x3", 2)]).inputs
  )
  second = padder.pad(
    executor.prepare_meta_batch(TINY_GHN, [_net("max_pool_3x3", 2)]).inputs
  )
  assert set(first["blocks"]) <= set(second["blocks"])


def test_padding_keeps_predictions():
  _, variables = ghn_lib.init_ghn(TINY_GHN, jax.random.PRNGKey(0))
  padder = padding.GrowingPadder()
  padder.pad(
    executor.prepare_meta_batch(TINY_GHN, [_net("conv_3x3", 6)] * 2).inputs
  )
  configs = [_net("sep_conv_3x3", 2), _net("conv_1x1", 3)]
  plain = executor.prepare_meta_batch(TINY_GHN, configs)
  padded = executor.prepare_meta_batch(TINY_GHN, configs, padder=padder)
  assert _shapes(padded.inputs) != _shapes(plain.inputs)

  ghn = ghn_lib.GHN(TINY_GHN)
  apply_fn = jax.jit(ghn.apply)
  plain_out = apply_fn(variables, plain.inputs)
  padded_out = apply_fn(variables, padded.inputs)
  for plans in plain.plans:
    want = ghn_lib.assemble_params(plain_out, plans, np)
    got = ghn_lib.assemble_params(padded_out, plans, np)
    for a, b in zip(
      jax.tree_util.tree_leaves(got),
      jax.tree_util.tree_leaves(want),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
