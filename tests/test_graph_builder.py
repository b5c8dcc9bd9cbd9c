"""Tests of the graph builder: reference graphs, direct builder, edge cases."""

import json
import os
import pathlib
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest
from networkx.algorithms import isomorphism

from ghn_jax import graph as graph_lib
from ghn_jax import graph_builder, graph_deepnets, zoo
from ghn_jax.deepnets1m import config as config_lib
from ghn_jax.deepnets1m import net, plan, sampler

REFERENCE_DIR = pathlib.Path(
  os.environ.get(
    "GHN_REFERENCE_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent
    / "shared"
    / "ghn2_reference",
  )
)
REFERENCE_CASES = sorted(
  p.stem for p in REFERENCE_DIR.glob("*.npz") if p.with_suffix(".json").exists()
)
OP = graph_lib.PRIMITIVE_INDEX
INPUT = (1, 8, 8, 3)


# Helpers.


def _digraph(ops, shapes, senders, receivers) -> nx.DiGraph:
  g = nx.DiGraph()
  for i, (op, shape) in enumerate(zip(ops, shapes, strict=True)):
    g.add_node(i, label=(int(op), tuple(int(s) for s in shape)))
  g.add_edges_from(
    zip(
      np.asarray(senders).tolist(), np.asarray(receivers).tolist(), strict=True
    )
  )
  return g


def _contract(g: nx.DiGraph, ops) -> nx.DiGraph:
  """Remove nodes of the given op types, joining their inputs to outputs."""
  g = g.copy()
  for v in [v for v, d in g.nodes(data=True) if d["label"][0] in ops]:
    for p in list(g.predecessors(v)):
      for q in list(g.successors(v)):
        if p != q:
          g.add_edge(p, q)
    g.remove_node(v)
  return nx.convert_node_labels_to_integers(g, ordering="sorted")


def _virtual_edge_set(g: nx.DiGraph, mapping=None) -> set:
  nodes = sorted(g.nodes)
  index = {v: i for i, v in enumerate(nodes)}
  edges = np.array([(index[s], index[r]) for s, r in g.edges], int)
  if edges.size == 0:
    return set()
  s, r, w = graph_lib.virtual_edges(edges[:, 0], edges[:, 1], len(nodes))
  if mapping is None:
    return set(zip(s.tolist(), r.tolist(), w.tolist(), strict=True))
  return {
    (mapping[a], mapping[b], c)
    for a, b, c in zip(s.tolist(), r.tolist(), w.tolist(), strict=True)
  }


def _reference_model(case: str):
  """Build the network of a reference case, or skip naming what is missing."""
  meta = json.loads((REFERENCE_DIR / f"{case}.json").read_text())
  if meta.get("net_args"):
    config = config_lib.config_from_net_args(meta["net_args"])
    shape = (1, config.input_size, config.input_size, 3)
    return net.Network(config), shape, config
  if meta["source"].startswith("torchvision.models.resnet18"):
    model, shape = zoo.create_model("resnet18", num_classes=10)
    return model, shape, None
  pytest.skip(f"{case}: no builder for source {meta['source']!r}")


def _assert_same_graph(a: graph_lib.Graph, b: graph_lib.Graph):
  for field in ("node_ops", "node_shapes", "node_param_perm", "senders"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), field)
  np.testing.assert_array_equal(a.receivers, b.receivers)
  assert a.node_params == b.node_params
  assert a.node_extra_params == b.node_extra_params
  assert a.node_names == b.node_names


def _build(model, shape=INPUT, **kwargs):
  return graph_builder.build_graph_with_report(
    model, input_shape=shape, cache=False, **kwargs
  )


# Faithfulness to the original's graphs.


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_graph_isomorphic(case):
  """The traced graph matches the original's, before and after virtual edges.

  Under torch 2.x the original misses attention (`msa`) nodes (its rule
  expects autograd's Clone 11 nodes after Softmax) and its squeeze-excitation
  (`cse`) rule depends on node order, so its stored graphs have neither.
  This builder follows the GHN-2 paper and keeps one node per attention and
  per SE block. When the reference lacks those nodes, ours are contracted
  (inputs joined to outputs, as the original's filter does) before the
  comparison, and their number is checked separately.
  """
  data = np.load(REFERENCE_DIR / f"{case}.npz")
  model, shape, config = _reference_model(case)
  graph, report = _build(model, shape, trace=True)
  assert report.num_predicted == report.num_params

  ours = _digraph(
    graph.node_ops, graph.node_shapes, graph.senders, graph.receivers
  )
  ref_ops = set(data["node_op_idx"].tolist())
  missing = {OP[o] for o in ("msa", "cse") if OP[o] not in ref_ops}
  if missing:
    ours = _contract(ours, missing)
  theirs = _digraph(
    data["node_op_idx"],
    data["node_shape"],
    data["senders_before_ve"],
    data["receivers_before_ve"],
  )
  matcher = isomorphism.DiGraphMatcher(
    ours, theirs, node_match=lambda a, b: a["label"] == b["label"]
  )
  assert matcher.is_isomorphic(), f"{case}: graphs differ"

  # With virtual edges (weights = shortest-path lengths), under the same
  # node mapping.
  expected = set(
    zip(
      data["senders"].tolist(),
      data["receivers"].tolist(),
      data["edge_weight"].tolist(),
      strict=True,
    )
  )
  assert _virtual_edge_set(ours, matcher.mapping) == expected

  if config is not None:
    cells = plan.build_plan(config).cells
    for op in ("msa", "cse"):
      live_ops = sum(
        1
        for cell in cells
        if cell.live
        for (name, _), live in zip(cell.edges, cell.edge_live, strict=True)
        if live and name == op
      )
      assert int(np.sum(graph.node_ops == OP[op])) == live_ops, op


def test_reference_cases_found():
  if not REFERENCE_DIR.is_dir():
    pytest.skip(f"reference graphs not found in {REFERENCE_DIR}")
  assert REFERENCE_CASES


# The direct DeepNets-1M builder equals the traced graph.


def _sampled_configs(num: int, seed: int):
  rng = np.random.default_rng(seed)
  return [
    arch.config for arch in sampler.sample_architectures("train", num, rng)
  ]


@pytest.mark.parametrize(
  "config",
  _sampled_configs(4, seed=0)
  + [sampler.predefined_configs()["ViT"]]
  + [c.replace(imagenet_input=True) for c in _sampled_configs(1, seed=1)],
)
def test_direct_graph_equals_traced(config):
  model = net.Network(config)
  shape = (1, config.input_size, config.input_size, 3)
  traced, traced_report = _build(model, shape, trace=True)
  direct, direct_report = graph_deepnets.build_deepnets_graph_with_report(
    config
  )
  _assert_same_graph(traced, direct)
  assert direct_report == traced_report


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_direct_graph_equals_traced_many(seed):
  for config in _sampled_configs(10, seed=100 + seed):
    shape = (1, config.input_size, config.input_size, 3)
    traced, _ = _build(net.Network(config), shape, trace=True)
    _assert_same_graph(traced, graph_deepnets.build_deepnets_graph(config))


def test_training_mode_with_dropout_traces():
  config = _sampled_configs(1, seed=4)[0].replace(num_fc_layers=2, fc_dim=16)
  shape = (1, config.input_size, config.input_size, 3)
  model = net.Network(config)
  train, _ = _build(model, shape, trace=True, apply_kwargs={"train": True})
  _assert_same_graph(train, graph_deepnets.build_deepnets_graph(config))


def test_build_graph_uses_direct_builder_for_networks():
  config = _sampled_configs(1, seed=3)[0]
  graph = graph_builder.build_graph(
    net.Network(config), input_shape=(1, 32, 32, 3)
  )
  _assert_same_graph(graph, graph_deepnets.build_deepnets_graph(config))


# Tiny hand-made models.


class _Dense(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, use_bias=self.use_bias)(x.reshape(x.shape[0], -1))


def test_single_dense_graph():
  graph, report = _build(_Dense())
  assert [graph_lib.PRIMITIVES[o] for o in graph.node_ops] == [
    "input",
    "conv",
    "bias",
  ]
  np.testing.assert_array_equal(graph.senders, [0, 1])
  np.testing.assert_array_equal(graph.receivers, [1, 2])
  np.testing.assert_array_equal(graph.node_shapes[1], [4, 192, 0, 0])
  np.testing.assert_array_equal(graph.node_param_perm[1, :2], [1, 0])
  assert graph.node_params[1:] == ("Dense_0/kernel", "Dense_0/bias")
  assert report.num_predicted == report.num_params == 192 * 4 + 4


def test_dense_without_bias_graph():
  graph, _ = _build(_Dense(use_bias=False))
  assert graph.num_nodes == 2
  assert graph.num_edges == 1


class _NoParams(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(x)


class _ParamsOffPath(nn.Module):
  @nn.compact
  def __call__(self, x):
    nn.Dense(3)(x)
    return jnp.tanh(x)


def test_model_without_parameters_rejected():
  with pytest.raises(ValueError, match="no parameters"):
    _build(_NoParams())
  with pytest.raises(ValueError, match="does not depend on any parameter"):
    _build(_ParamsOffPath())


def test_missing_input_shape_rejected():
  with pytest.raises(ValueError, match="input_shape"):
    graph_builder.build_graph(_Dense())


class _ConvBn(nn.Module):
  groups: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), use_bias=False)(x)
    x = nn.Conv(
      6,
      (3, 3),
      feature_group_count=self.groups,
      kernel_dilation=self.dilation,
      use_bias=False,
    )(x)
    x = nn.BatchNorm(use_running_average=False)(x)
    x = nn.relu(x)
    return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize(
  "groups, dilation, op",
  [(1, 1, "conv"), (1, 2, "conv"), (6, 1, "sep_conv"), (6, 2, "dil_conv")],
)
def test_conv_types(groups, dilation, op):
  graph, _ = _build(_ConvBn(groups, dilation))
  names = [graph_lib.PRIMITIVES[o] for o in graph.node_ops]
  assert names == ["input", "conv", op, "bn", "glob_avg", "conv", "bias"]
  np.testing.assert_array_equal(graph.node_shapes[2], [6, 6 // groups, 3, 3])
  np.testing.assert_array_equal(graph.node_param_perm[2], [2, 3, 1, 0])
  # Batch norm is one node fed by the conv, predicting scale and bias.
  assert graph.node_extra_params[3] == "BatchNorm_0/bias"
  np.testing.assert_array_equal(graph.senders, np.arange(6))
  np.testing.assert_array_equal(graph.receivers, np.arange(1, 7))


class _Merge(nn.Module):
  same_input: bool = False

  @nn.compact
  def __call__(self, x):
    a = nn.Conv(4, (1, 1))(x)
    b = a if self.same_input else nn.Conv(4, (1, 1))(x)
    s = a + b
    c = jnp.concatenate([s, nn.max_pool(a, (3, 3), padding="SAME")], -1)
    c = nn.avg_pool(c, (2, 2), strides=(2, 2))
    return nn.Dense(3)(c.reshape(c.shape[0], -1))


def test_sum_concat_and_pools():
  graph, _ = _build(_Merge())
  counts = {op: int(np.sum(graph.node_ops == OP[op])) for op in OP}
  assert counts["sum"] == 1
  assert counts["concat"] == 1
  assert counts["max_pool"] == 1
  assert counts["avg_pool"] == 1
  pools = graph.node_ops == OP["max_pool"]
  np.testing.assert_array_equal(graph.node_shapes[pools][0], [1, 1, 3, 3])
  avg = graph.node_ops == OP["avg_pool"]
  np.testing.assert_array_equal(graph.node_shapes[avg][0], [1, 1, 2, 2])
  sum_node = int(np.flatnonzero(graph.node_ops == OP["sum"])[0])
  assert np.sum(graph.receivers == sum_node) == 2


def test_sum_of_one_source_is_not_a_node():
  graph, _ = _build(_Merge(same_input=True))
  assert not np.any(graph.node_ops == OP["sum"])


class _DeadBranch(nn.Module):
  @nn.compact
  def __call__(self, x):
    nn.Dense(5, name="unused")(x)
    return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def test_parameters_off_the_output_path_are_pruned():
  graph, report = _build(_DeadBranch())
  assert report.pruned_params == ("unused/bias", "unused/kernel")
  assert "unused/kernel" not in graph.node_params
  assert report.num_predicted == 192 * 2 + 2


class _Embedding(nn.Module):
  @nn.compact
  def __call__(self, x):
    tokens = x.reshape(x.shape[0], -1).astype(jnp.int32) % 7
    h = nn.Embed(7, 4, name="embed")(tokens)
    return nn.Dense(2, name="head")(h.mean(1))


class _Conv1D(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3,), name="conv1d")(x.reshape(x.shape[0], -1, 3))
    return nn.Dense(2, name="head")(h.mean(1))


class _GroupNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.GroupNorm(num_groups=1, name="gn")(nn.Conv(4, (1, 1))(x))
    return nn.Dense(2, name="head")(h.mean((1, 2)))


class _Recurrent(nn.Module):
  @nn.compact
  def __call__(self, x):
    seq = x.reshape(x.shape[0], -1, 3)
    h = nn.RNN(nn.LSTMCell(5), name="rnn")(seq)
    return nn.Dense(2, name="head")(h[:, -1])


class _Tied(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(192, name="shared")
    h = x.reshape(x.shape[0], -1)
    return nn.Dense(2, name="head")(layer(nn.relu(layer(h))))


@pytest.mark.parametrize(
  "model, param, reason",
  [
    (_Embedding(), "embed/embedding", "Embed"),
    (_Conv1D(), "conv1d/kernel", "1-D convolution"),
    (_GroupNorm(), "gn/scale", "GroupNorm"),
    (_Recurrent(), "LSTMCell_0/ii/kernel", "LSTMCell|scan"),
    (_Tied(), "shared/kernel", "tied"),
  ],
)
def test_unsupported_layers_warn_and_raise(model, param, reason):
  with pytest.warns(graph_builder.UnsupportedLayerWarning, match=param):
    _, report = _build(model)
  assert re.search(reason, report.unsupported_params[param])
  assert "head/kernel" in report.predicted_params
  with pytest.raises(ValueError, match=param):
    _build(model, strict=True)


def test_cache_returns_same_graph_and_warns_again():
  graph_builder.clear_cache()
  first = graph_builder.build_graph(_Dense(), input_shape=INPUT)
  second = graph_builder.build_graph(_Dense(), input_shape=INPUT)
  assert first is second
  third = graph_builder.build_graph(_Dense(), input_shape=(2, 8, 8, 3))
  assert third is not first
  for _ in range(2):
    with pytest.warns(graph_builder.UnsupportedLayerWarning):
      graph_builder.build_graph(_Embedding(), input_shape=INPUT)


def test_given_variables_match_abstract_init():
  model = _Dense()
  variables = model.init(jax.random.key(0), jnp.ones(INPUT))
  with_vars, _ = _build(model, variables=variables)
  without, _ = _build(model)
  _assert_same_graph(with_vars, without)


def test_attention_has_one_msa_node_per_block():
  model = zoo.ViT(depth=2, dim=32, num_heads=4, mlp_dim=64)
  graph, report = _build(model, (1, 16, 16, 3))
  assert int(np.sum(graph.node_ops == OP["msa"])) == 2
  assert report.num_predicted == report.num_params
  msa = int(np.flatnonzero(graph.node_ops == OP["msa"])[0])
  # Query, key and value projections (with biases) feed the attention.
  inputs = graph.senders[graph.receivers == msa]
  assert sorted(graph.node_params[i] for i in inputs) == [
    "block0/attention/key/bias",
    "block0/attention/query/bias",
    "block0/attention/value/bias",
  ]


def test_param_perm_restores_flax_layout():
  """Transposing a GHN-layout array by the perm (then reshaping) fits."""
  model = zoo.ViT(depth=1, dim=32, num_heads=4, mlp_dim=64)
  shape = (1, 16, 16, 3)
  graph, _ = _build(model, shape)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones(shape))
  flat = graph_builder._param_leaves(variables["params"])
  for i, path in enumerate(graph.node_params):
    if not path:
      continue
    ndim = int(np.sum(graph.node_shapes[i] > 0))
    ghn = np.zeros(graph.node_shapes[i, :ndim])
    moved = np.transpose(ghn, graph.node_param_perm[i, :ndim])
    assert moved.size == flat[path].size, path
    if moved.ndim == len(flat[path].shape):
      assert moved.shape == flat[path].shape, path


def test_build_ignores_warnings_for_supported_zoo_model():
  with warnings.catch_warnings():
    warnings.simplefilter("error", graph_builder.UnsupportedLayerWarning)
    model, shape = zoo.create_model("mobilenet")
    graph, report = _build(model, shape)
  assert report.unsupported_params == {}
  assert graph.node_ops[-1] == OP["bias"]
