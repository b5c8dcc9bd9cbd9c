"""Tests of DeepNets-1M genotypes, configurations, plans and networks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from ghn_jax.deepnets1m import genotypes as genotypes_lib
from ghn_jax.deepnets1m import plan as plan_lib
from ghn_jax.deepnets1m import sampler as sampler_lib
from ghn_jax.deepnets1m.config import NetConfig, config_from_net_args
from ghn_jax.deepnets1m.net import Network, abstract_params

GHN_PRIMITIVES = {
  "conv",
  "sep_conv",
  "dil_conv",
  "bn",
  "ln",
  "pos_enc",
  "msa",
  "cse",
  "bias",
  "max_pool",
  "avg_pool",
}


def _genotype(normal, normal_concat, reduce=None, reduce_concat=None):
  return genotypes_lib.Genotype(
    normal,
    normal_concat,
    reduce if reduce is not None else normal,
    reduce_concat if reduce_concat is not None else normal_concat,
  )


# Genotypes


def test_genotype_rejects_unknown_op():
  with pytest.raises(ValueError, match="'conv_9x9'"):
    _genotype((("conv_9x9", 0), ("conv_3x3", 1)), (2,))


def test_genotype_rejects_out_of_range_state():
  with pytest.raises(ValueError, match="reads state 2"):
    _genotype((("conv_3x3", 0), ("conv_3x3", 2)), (2,))


def test_genotype_rejects_bad_concat():
  with pytest.raises(ValueError, match="concatenates state 1"):
    _genotype((("conv_3x3", 0), ("conv_3x3", 1)), (1,))


def test_genotype_dict_round_trip():
  for genotype in (
    genotypes_lib.DARTS,
    genotypes_lib.PDARTS,
    genotypes_lib.VIT,
  ):
    assert genotypes_lib.Genotype.from_dict(genotype.to_dict()) == genotype


def test_get_genotype_unknown_name():
  with pytest.raises(ValueError, match="'NASNet'"):
    genotypes_lib.get_genotype("NASNet")


def test_parse_op_kinds_and_kernels():
  assert plan_lib.parse_op("sep_conv_5x5") == ("sep_conv", 5)
  assert plan_lib.parse_op("conv_7x1_1x7") == ("conv_double", 7)
  assert plan_lib.parse_op("max_pool_3x3") == ("max_pool", 3)
  assert plan_lib.parse_op("msa") == ("msa", 0)
  with pytest.raises(ValueError, match="'conv'"):
    plan_lib.parse_op("conv")


# Configurations


def test_config_from_net_args_string_and_round_trip():
  net_args = (
    "{'C': 24, 'genotype': 'DARTS', 'n_cells': 5, 'ks': 5, 'fc_layers': 2, "
    "'fc_dim': 64, 'norm': 'bnorm', 'glob_avg': False}"
  )
  config = config_from_net_args(net_args)
  assert config.channels == 24
  assert config.genotype == genotypes_lib.DARTS
  assert config.num_fc_layers == 2
  assert config.global_pooling is False
  assert config_from_net_args(config.to_net_args()) == config


def test_config_from_net_args_rejects_unknown_key():
  with pytest.raises(ValueError, match="'width'"):
    config_from_net_args({"genotype": "ViT", "width": 3})


def test_config_from_net_args_rejects_auxiliary_head():
  with pytest.raises(ValueError, match="auxiliary"):
    config_from_net_args({"genotype": "DARTS", "auxiliary": True})


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"stem_type": 2}, "stem_type"),
    ({"norm": "group"}, "'group'"),
    ({"channels": 0}, "channels"),
    ({"num_fc_layers": 2, "fc_dim": 0}, "fc_dim"),
    ({"preprocess": False}, "preprocess=False"),
  ],
)
def test_config_rejects_invalid_values(changes, message):
  with pytest.raises(ValueError, match=message):
    NetConfig(genotype=genotypes_lib.DARTS, **changes)


def test_config_vit_defaults_to_msa_presence():
  assert NetConfig(genotype=genotypes_lib.VIT).vit is True
  assert NetConfig(genotype=genotypes_lib.DARTS).vit is False


# Plans


def test_disconnected_network_raises():
  genotype = _genotype((("none", 0), ("none", 1)), (2,))
  config = NetConfig(genotype=genotype, num_cells=3)
  with pytest.raises(ValueError, match="disconnected"):
    plan_lib.build_plan(config)
  with pytest.raises(ValueError, match="disconnected"):
    Network(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_unused_cell_input_is_not_created():
  # Reduction cells read input 0 only through 'none': its preprocessing
  # exists in the original but does not reach the logits.
  genotype = _genotype(
    (("conv_3x3", 1), ("dil_conv_3x3", 0), ("none", 0), ("sep_conv_3x3", 1)),
    (2, 3),
    (
      ("avg_pool_3x3", 1),
      ("none", 0),
      ("skip_connect", 1),
      ("avg_pool_3x3", 2),
    ),
    (2, 3),
  )
  config = NetConfig(genotype=genotype, channels=8, num_cells=6, stem_type=1)
  plan = plan_lib.build_plan(config)
  reductions = [c.index for c in plan.cells if c.reduction]
  assert reductions == [2, 4]
  for cell in plan.cells:
    assert cell.preprocess_live == (not cell.reduction, True)
  dead = [s for s in plan_lib.param_specs(config) if not s.live]
  assert {s.path.split("/")[0] for s in dead} == {"cells_2", "cells_4"}
  assert all("/preprocess0/" in s.path for s in dead)
  assert plan_lib.count_params(config, include_dead=True) == (
    plan_lib.count_params(config) + sum(s.size for s in dead)
  )


def test_sum_node_outside_concat_is_dead():
  genotype = _genotype(
    (("conv_3x3", 0), ("conv_1x1", 1), ("sep_conv_3x3", 0), ("conv_3x3", 1)),
    (3,),
  )
  plan = plan_lib.build_plan(NetConfig(genotype=genotype, num_cells=4))
  for cell in plan.cells:
    assert cell.edge_live == (False, False, True, True)


def test_empty_concat_state_is_zero_filled():
  # State 2 sums two 'none' ops, so it is empty; the concatenation fills
  # it with zeros and the cell output keeps 2 * C channels.
  genotype = _genotype(
    (("none", 0), ("none", 1), ("conv_3x3", 0), ("conv_1x1", 1)), (2, 3)
  )
  config = NetConfig(genotype=genotype, channels=8, num_cells=2)
  plan = plan_lib.build_plan(config)
  assert plan.cells[0].state_present == (True, True, False, True)
  assert plan.classifier_in == 2 * plan.cells[-1].channels_out
  x = jnp.ones((2, 32, 32, 3))
  params = _random_params(config)
  assert Network(config).apply(params, x).shape == (2, 10)


def test_resolutions_cifar_and_imagenet():
  base = NetConfig(genotype=genotypes_lib.DARTS, num_cells=6)
  assert plan_lib.build_plan(base).resolution == 8
  assert plan_lib.build_plan(base.replace(stem_type=1)).resolution == 4
  assert plan_lib.build_plan(base.replace(stem_pool=True)).resolution == 4
  imagenet = base.replace(imagenet_input=True)
  assert plan_lib.build_plan(imagenet).resolution == 14
  assert plan_lib.build_plan(imagenet.replace(stem_type=1)).resolution == 7
  vit = NetConfig(
    genotype=genotypes_lib.VIT,
    num_cells=3,
    preprocess=False,
    channel_multiplier=1,
  )
  assert plan_lib.build_plan(vit).resolution == 11
  assert plan_lib.build_plan(vit.replace(imagenet_input=True)).resolution == 14


# Networks


def _sampled_configs():
  configs = []
  for split in ("train", "deep", "dense", "bnfree", "search"):
    rng = sampler_lib.split_rng(split, seed=3)
    for arch in sampler_lib.sample_architectures(split, 3, rng):
      configs.append(arch.config)
  configs += list(sampler_lib.predefined_configs().values())
  configs.append(configs[0].replace(imagenet_input=True))
  configs.append(
    sampler_lib.predefined_configs(imagenet_input=True)["ViT"].replace(
      num_cells=2
    )
  )
  return configs


SAMPLED = _sampled_configs()


@pytest.mark.parametrize("index", range(len(SAMPLED)))
def test_flax_params_equal_plan_specs(index):
  config = SAMPLED[index]
  size = config.input_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(Network(config).init, jax.random.key(0), x)
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  expected = {s.path: s.shape for s in plan_lib.param_specs(config) if s.live}
  assert {k: tuple(v.shape) for k, v in flat.items()} == expected
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  assert total == plan_lib.count_params(config)
  abstract = abstract_params(config)
  assert jax.tree_util.tree_structure(abstract) == (
    jax.tree_util.tree_structure(shapes["params"])
  )
  assert jax.tree_util.tree_all(
    jax.tree_util.tree_map(
      lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
      abstract,
      shapes["params"],
    )
  )


def _module_classes(config):
  """Map each module path to its class, recorded while initialising."""
  classes = {}

  def record(next_fun, args, kwargs, context):
    classes["/".join(context.module.path)] = type(context.module)
    return next_fun(*args, **kwargs)

  size = config.input_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(Network(config).init, jax.random.key(0), x)
  return classes


@pytest.mark.parametrize("name", ["darts", "vit", "sampled"])
def test_ghn_primitive_attributes_type_params(name):
  config = {
    "darts": NetConfig(genotype=genotypes_lib.DARTS, num_cells=3),
    "vit": NetConfig(
      genotype=genotypes_lib.VIT,
      num_cells=3,
      preprocess=False,
      channel_multiplier=1,
    ),
    "sampled": SAMPLED[0],
  }[name]
  classes = _module_classes(config)
  for spec in plan_lib.param_specs(config):
    if not spec.live:
      continue
    owner, leaf = spec.path.rsplit("/", 1)
    primitive = classes[owner].ghn_primitive
    assert primitive in GHN_PRIMITIVES
    if leaf == "bias" and spec.primitive == "bias":
      continue  # A Dense bias is a node of its own.
    assert primitive == spec.primitive, spec.path


def _random_params(config, seed=0):
  """Fill the network's parameters with small random values (no init)."""
  rng = np.random.default_rng(seed)
  params = {
    spec.path: jnp.asarray(
      0.3 * rng.standard_normal(spec.shape), dtype=jnp.float32
    )
    for spec in plan_lib.param_specs(config)
    if spec.live
  }
  return {"params": traverse_util.unflatten_dict(params, sep="/")}


FORWARD_CASES = {
  "simple_stem": NetConfig(
    genotype=genotypes_lib.DARTS, channels=8, num_cells=3
  ),
  "darts_stem_pool_free": NetConfig(
    genotype=genotypes_lib.PDARTS, channels=8, num_cells=3, stem_type=1
  ),
  "vit": NetConfig(
    genotype=genotypes_lib.VIT,
    channels=16,
    num_cells=2,
    preprocess=False,
    channel_multiplier=1,
  ),
  "no_bn_flatten_head": NetConfig(
    genotype=_genotype(
      (("cse", 0), ("conv_7x1_1x7", 1), ("msa", 2), ("skip_connect", 0)),
      (2, 3),
    ),
    channels=8,
    num_cells=4,
    norm=None,
    global_pooling=False,
    stem_pool=True,
    num_fc_layers=2,
    fc_dim=12,
  ),
  "one_cell": NetConfig(
    genotype=_genotype((("conv_1x1", 0), ("max_pool_3x3", 1)), (2,)),
    channels=4,
    num_cells=1,
  ),
}


@pytest.mark.parametrize("name", sorted(FORWARD_CASES))
def test_network_forward_shapes(name):
  config = FORWARD_CASES[name]
  model = Network(config)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits = model.apply(_random_params(config), x)
  assert logits.shape == (2, config.num_classes)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_init_creates_only_params():
  model = Network(FORWARD_CASES["one_cell"])
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(variables) == {"params"}


def test_jit_and_eager_logits_agree():
  config = FORWARD_CASES["one_cell"]
  model = Network(config)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = _random_params(config)
  np.testing.assert_allclose(
    jax.jit(model.apply)(params, x),
    model.apply(params, x),
    rtol=1e-4,
    atol=1e-5,
  )


def test_imagenet_input_forward():
  config = NetConfig(
    genotype=genotypes_lib.DARTS, channels=4, num_cells=2, imagenet_input=True
  )
  model = Network(config)
  x = jnp.ones((1, 224, 224, 3))
  assert model.apply(_random_params(config), x).shape == (1, 10)


def test_network_rejects_wrong_input_shape():
  model = Network(FORWARD_CASES["one_cell"])
  with pytest.raises(ValueError, match=r"\(1, 28, 28, 3\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))


def test_classifier_dropout_only_when_training():
  config = FORWARD_CASES["no_bn_flatten_head"]
  model = Network(config)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = _random_params(config)
  apply = model.apply
  eval_logits = apply(params, x)
  np.testing.assert_allclose(apply(params, x), eval_logits)
  train_logits = apply(
    params, x, train=True, rngs={"dropout": jax.random.key(2)}
  )
  assert not np.allclose(train_logits, eval_logits)


def test_config_rejects_msa_with_fewer_channels_than_heads():
  with pytest.raises(ValueError, match="channels=4 is too few for the msa"):
    NetConfig(genotype=genotypes_lib.VIT, channels=4)
