"""Tests of graph pictures and their layered layout."""

import numpy as np
import pytest

from ghn_jax import graph as graph_lib
from ghn_jax import graph_deepnets, plot_graph
from ghn_jax.deepnets1m import sampler

OP = graph_lib.PRIMITIVE_INDEX
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _graph(ops, senders, receivers) -> graph_lib.Graph:
  n = len(ops)
  return graph_lib.Graph(
    node_ops=np.array([OP[o] for o in ops], np.int32),
    node_shapes=np.zeros((n, 4), np.int64),
    node_params=("",) * n,
    node_extra_params=("",) * n,
    node_param_perm=np.tile(np.arange(4, dtype=np.int32), (n, 1)),
    senders=np.array(senders, np.int32),
    receivers=np.array(receivers, np.int32),
  )


def _darts_graph():
  config = sampler.predefined_configs()["DARTS"].replace(num_cells=4)
  return graph_deepnets.build_deepnets_graph(config)


def test_depths_follow_longest_path():
  # input -> conv -> bn -> sum, input -> sum (skip), pos_enc -> sum.
  g = _graph(
    ["input", "conv", "bn", "pos_enc", "sum"],
    [0, 1, 2, 0, 3],
    [1, 2, 4, 4, 4],
  )
  np.testing.assert_array_equal(plot_graph.node_depths(g), [0, 1, 2, 2, 3])


def test_layout_edges_point_forward():
  g = _darts_graph()
  pos = plot_graph.layered_layout(g)
  x = np.array([pos[i][0] for i in range(g.num_nodes)])
  assert np.all(x[g.receivers] > x[g.senders])
  # Nodes of one layer never overlap.
  points = {(round(p[0], 6), round(p[1], 6)) for p in pos.values()}
  assert len(points) == g.num_nodes


def test_plot_writes_png(tmp_path):
  path = tmp_path / "g.png"
  fig = plot_graph.plot_graph(_darts_graph(), str(path), title="DARTS")
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert "sep_conv" in labels
  assert "max_pool" in labels
  assert "msa" not in labels


def test_plot_single_node(tmp_path):
  fig = plot_graph.plot_graph(
    _graph(["input"], [], []), str(tmp_path / "a.png")
  )
  assert fig.axes


def test_plot_rejects_empty_graph():
  with pytest.raises(ValueError, match="empty"):
    plot_graph.plot_graph(_graph([], [], []))


def test_primitive_counts():
  counts = plot_graph.primitive_counts(_darts_graph())
  assert counts["input"] == 1
  assert counts["glob_avg"] == 1
  assert "msa" not in counts
