"""Tests of virtual edges, jraph conversion, padding and graph files."""

import os
import pathlib

import jax
import jax.numpy as jnp
import jraph
import networkx as nx
import numpy as np
import pytest

from ghn_jax import graph as graph_lib
from ghn_jax import jraph_utils

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


def _chain_graph(num_nodes: int) -> graph_lib.Graph:
  """A graph input -> conv -> ... in a chain, with no parameters."""
  ops = np.full(num_nodes, graph_lib.PRIMITIVE_INDEX["conv"], np.int32)
  if num_nodes:
    ops[0] = graph_lib.PRIMITIVE_INDEX["input"]
  return graph_lib.Graph(
    node_ops=ops,
    node_shapes=np.zeros((num_nodes, 4), np.int64),
    node_params=("",) * num_nodes,
    node_extra_params=("",) * num_nodes,
    node_param_perm=np.tile(np.arange(4, dtype=np.int32), (num_nodes, 1)),
    senders=np.arange(max(num_nodes - 1, 0), dtype=np.int32),
    receivers=np.arange(1, max(num_nodes, 1), dtype=np.int32),
    node_names=tuple(f"n{i}" for i in range(num_nodes)),
  )


def _networkx_virtual_edges(senders, receivers, num_nodes, cutoff):
  """Virtual edges from networkx's all-pairs BFS, as the original computes."""
  g = nx.DiGraph()
  g.add_nodes_from(range(num_nodes))
  g.add_edges_from(zip(senders.tolist(), receivers.tolist(), strict=True))
  lengths = dict(nx.all_pairs_shortest_path_length(g, cutoff=cutoff))
  edges = sorted(
    (s, r, d) for s in lengths for r, d in lengths[s].items() if d > 0
  )
  if not edges:
    return np.zeros((0, 3), np.int64)
  return np.array(edges, np.int64)


def test_virtual_edges_chain_weights():
  s, r, w = graph_lib.virtual_edges(
    np.array([0, 1, 2]), np.array([1, 2, 3]), 4, cutoff=50
  )
  np.testing.assert_array_equal(s, [0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(r, [1, 2, 3, 2, 3, 3])
  np.testing.assert_array_equal(w, [1, 2, 3, 1, 2, 1])


def test_virtual_edges_respect_cutoff():
  s, r, w = graph_lib.virtual_edges(
    np.arange(9), np.arange(1, 10), 10, cutoff=3
  )
  assert w.max() == 3
  assert len(s) == 9 + 8 + 7
  assert np.all(r > s)


def test_virtual_edges_cutoff_one_keeps_real_edges():
  s, r, w = graph_lib.virtual_edges(
    np.array([1, 0, 0]), np.array([2, 1, 1]), 3, cutoff=1
  )
  np.testing.assert_array_equal(s, [0, 1])
  np.testing.assert_array_equal(r, [1, 2])
  np.testing.assert_array_equal(w, [1, 1])


def test_virtual_edges_shortest_path_wins():
  # 0 -> 1 -> 2 -> 3 and a shortcut 0 -> 3: the pair (0, 3) has weight 1.
  s, r, w = graph_lib.virtual_edges(
    np.array([0, 1, 2, 0]), np.array([1, 2, 3, 3]), 4, cutoff=50
  )
  pairs = zip(s.tolist(), r.tolist(), strict=True)
  weights = dict(zip(pairs, w.tolist(), strict=True))
  assert weights[(0, 3)] == 1
  assert weights[(0, 2)] == 2
  assert weights[(1, 3)] == 2


@pytest.mark.parametrize("num_nodes", [0, 1])
def test_virtual_edges_no_edges(num_nodes):
  s, r, w = graph_lib.virtual_edges(
    np.zeros(0, int), np.zeros(0, int), num_nodes
  )
  assert s.shape == r.shape == w.shape == (0,)
  assert s.dtype == np.int32


def test_virtual_edges_match_networkx_on_random_dag():
  rng = np.random.default_rng(0)
  n = 120
  pairs = rng.integers(0, n, size=(400, 2))
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  senders, receivers = pairs.min(1), pairs.max(1)
  for cutoff in (1, 2, 5, 50):
    s, r, w = graph_lib.virtual_edges(senders, receivers, n, cutoff)
    expected = _networkx_virtual_edges(senders, receivers, n, cutoff)
    np.testing.assert_array_equal(np.stack([s, r, w], 1), expected)


def test_virtual_edges_reject_bad_input():
  with pytest.raises(ValueError, match="self-loops"):
    graph_lib.virtual_edges(np.array([1]), np.array([1]), 2)
  with pytest.raises(ValueError, match="outside"):
    graph_lib.virtual_edges(np.array([0]), np.array([5]), 2)
  with pytest.raises(ValueError, match="cutoff"):
    graph_lib.virtual_edges(np.array([0]), np.array([1]), 2, cutoff=-1)


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_virtual_edges_match_reference(case):
  data = np.load(REFERENCE_DIR / f"{case}.npz")
  s, r, w = graph_lib.virtual_edges(
    data["senders_before_ve"],
    data["receivers_before_ve"],
    len(data["node_op_idx"]),
    graph_lib.DEFAULT_VIRTUAL_EDGE_CUTOFF,
  )
  np.testing.assert_array_equal(s, data["senders"])
  np.testing.assert_array_equal(r, data["receivers"])
  np.testing.assert_array_equal(w, data["edge_weight"])


def test_reference_cases_present():
  if not REFERENCE_DIR.is_dir():
    pytest.skip(f"reference graphs not found in {REFERENCE_DIR}")
  assert REFERENCE_CASES, f"no <arch>.npz/.json pairs in {REFERENCE_DIR}"


def test_graphs_tuple_fields():
  g = _chain_graph(4)
  gt = jraph_utils.graph_to_graphs_tuple(g)
  np.testing.assert_array_equal(gt.nodes["op"], g.node_ops)
  assert gt.nodes["shape"].shape == (4, 4)
  np.testing.assert_array_equal(gt.n_node, [4])
  np.testing.assert_array_equal(gt.n_edge, [6])
  np.testing.assert_array_equal(gt.edges["weight"], [1, 2, 3, 1, 2, 1])


def test_graphs_tuple_one_node():
  gt = jraph_utils.graph_to_graphs_tuple(_chain_graph(1))
  np.testing.assert_array_equal(gt.n_node, [1])
  np.testing.assert_array_equal(gt.n_edge, [0])
  assert gt.senders.shape == (0,)


def test_batch_offsets_senders():
  a = jraph_utils.graph_to_graphs_tuple(_chain_graph(3))
  b = jraph_utils.graph_to_graphs_tuple(_chain_graph(2))
  batch = jraph_utils.batch_graphs([a, b])
  np.testing.assert_array_equal(batch.n_node, [3, 2])
  np.testing.assert_array_equal(batch.senders, [0, 0, 1, 3])
  np.testing.assert_array_equal(batch.receivers, [1, 2, 2, 4])
  np.testing.assert_array_equal(
    jraph_utils.node_graph_index(batch), [0] * 3 + [1] * 2
  )


def test_batch_graphs_rejects_empty():
  with pytest.raises(ValueError, match="at least one graph"):
    jraph_utils.batch_graphs([])


def test_bucket_size_sequence():
  sizes = [jraph_utils.bucket_size(n, 64) for n in (0, 63, 64, 95, 96, 500)]
  assert sizes == [64, 64, 96, 96, 128, 512]
  assert all(s % jraph_utils.BUCKET_ALIGNMENT == 0 for s in sizes)
  with pytest.raises(ValueError, match="count"):
    jraph_utils.bucket_size(-1, 64)


def test_padded_batch_masks_and_weights():
  graphs = [_chain_graph(5), _chain_graph(1), _chain_graph(3)]
  padded = jraph_utils.graphs_to_padded_batch(graphs)
  num_real_edges = 10 + 0 + 3
  assert padded.nodes["op"].shape == (jraph_utils.MIN_NODE_BUCKET,)
  assert padded.senders.shape == (jraph_utils.MIN_EDGE_BUCKET,)
  np.testing.assert_array_equal(padded.n_node[:3], [5, 1, 3])
  node_mask = jraph_utils.node_padding_mask(padded)
  edge_mask = jraph_utils.edge_padding_mask(padded)
  assert node_mask.sum() == 9
  assert edge_mask.sum() == num_real_edges
  np.testing.assert_array_equal(
    node_mask, np.asarray(jraph.get_node_padding_mask(padded))
  )
  assert np.all(padded.edges["weight"][~edge_mask] == 1)
  assert np.all(padded.edges["weight"] >= 1)
  assert padded.senders.dtype == np.int32


def test_padding_rejects_small_sizes():
  gt = jraph_utils.graph_to_graphs_tuple(_chain_graph(4))
  with pytest.raises(ValueError, match="num_nodes"):
    jraph_utils.pad_graphs(gt, num_nodes=4)
  with pytest.raises(ValueError, match="num_edges"):
    jraph_utils.pad_graphs(gt, num_nodes=8, num_edges=2)


@pytest.mark.parametrize("use_jit", [False, True])
def test_padded_batch_segment_sum(use_jit):
  """Messages summed per receiver are unchanged by padding."""
  graphs = [_chain_graph(4), _chain_graph(3)]
  padded = jraph_utils.graphs_to_padded_batch(graphs)

  def incoming_weight(gt):
    return jraph.segment_sum(
      gt.edges["weight"].astype(jnp.float32),
      gt.receivers,
      num_segments=gt.nodes["op"].shape[0],
    )

  fn = jax.jit(incoming_weight) if use_jit else incoming_weight
  sums = np.asarray(fn(jax.tree_util.tree_map(jnp.asarray, padded)))
  np.testing.assert_allclose(sums[:7], [0, 1, 3, 6, 0, 1, 3])


def test_save_load_roundtrip(tmp_path):
  g = _chain_graph(5)
  path = tmp_path / "g.npz"
  graph_lib.save_graph(str(path), g)
  loaded = graph_lib.load_graph(str(path))
  for field in ("node_ops", "node_shapes", "node_param_perm", "senders"):
    np.testing.assert_array_equal(getattr(loaded, field), getattr(g, field))
  assert loaded.node_names == g.node_names
  assert loaded.node_params == g.node_params
  with np.load(path, allow_pickle=False) as data:
    assert data["node_names"].dtype.kind == "U"


def test_validate_rejects_mismatched_fields():
  g = _chain_graph(3)
  bad = graph_lib.Graph(
    node_ops=g.node_ops,
    node_shapes=g.node_shapes[:2],
    node_params=g.node_params,
    node_extra_params=g.node_extra_params,
    node_param_perm=g.node_param_perm,
    senders=g.senders,
    receivers=g.receivers,
  )
  with pytest.raises(ValueError, match="node_shapes"):
    bad.validate()
