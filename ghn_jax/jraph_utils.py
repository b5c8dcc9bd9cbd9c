"""Conversion of `Graph`s into padded `jraph.GraphsTuple` batches.

All jraph use of the package goes through this module. jraph's last release
(0.0.6.dev0, 2022) still calls the removed `jax.tree_map` in
`zero_out_padding` and `get_fully_connected_graph`, so only its NumPy batching
and padding helpers are used here.

A graph becomes a `GraphsTuple` with
  nodes = {"op": int32 (N,), index into `PRIMITIVES`,
           "shape": int32 (N, 4), shape in GHN layout, 0-padded},
  edges = {"weight": int32 (E,), 1 for real edges, the shortest-path length
           for virtual edges (GHN-2 paper, Eq. 4)},
with senders and receivers sorted by (sender, receiver). Batches are padded
to a small set of sizes (buckets) so that a jitted GHN compiles once per
bucket instead of once per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jraph
import numpy as np

from ghn_jax import graph as graph_lib

# Smallest padded sizes. Larger sizes grow by a factor of sqrt(2) per bucket,
# so padding adds at most ~41% to a batch, and a meta-training run compiles
# for an estimated few dozen distinct shapes.
MIN_NODE_BUCKET = 64
MIN_EDGE_BUCKET = 512
BUCKET_GROWTH = math.sqrt(2.0)
# Padded sizes are rounded up to a multiple of this (friendly to TPU tiles).
BUCKET_ALIGNMENT = 8
# Weight given to padding edges, so that a GHN dividing by edge weights
# (Eq. 4) never divides by zero on padding.
PADDING_EDGE_WEIGHT = 1


def graph_to_graphs_tuple(
  graph: graph_lib.Graph,
  cutoff: int = graph_lib.DEFAULT_VIRTUAL_EDGE_CUTOFF,
) -> jraph.GraphsTuple:
  """Convert one graph into a `GraphsTuple` with virtual edges.

  Args:
    graph: the computational graph.
    cutoff: maximum shortest-path length of a virtual edge; values below 2
      keep only the real edges.

  Returns:
    A `GraphsTuple` of one graph holding NumPy arrays (see the module
    docstring for the fields).
  """
  graph.validate()
  senders, receivers, weight = graph_lib.virtual_edges(
    graph.senders, graph.receivers, graph.num_nodes, cutoff
  )
  return jraph.GraphsTuple(
    nodes={
      "op": np.asarray(graph.node_ops, np.int32),
      "shape": np.asarray(graph.node_shapes, np.int32).reshape(-1, 4),
    },
    edges={"weight": weight},
    senders=senders,
    receivers=receivers,
    n_node=np.array([graph.num_nodes], np.int32),
    n_edge=np.array([senders.size], np.int32),
    globals=None,
  )


def batch_graphs(graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
  """Concatenate graphs into one `GraphsTuple` (NumPy, no padding).

  Raises:
    ValueError: if `graphs` is empty.
  """
  if not graphs:
    raise ValueError("batch_graphs needs at least one graph, got none.")
  return jraph.batch_np(list(graphs))


def bucket_size(count: int, minimum: int) -> int:
  """Return the smallest bucket size that fits `count` + 1 items.

  Buckets are `minimum * BUCKET_GROWTH**k`, rounded up to a multiple of
  `BUCKET_ALIGNMENT`. The +1 leaves room for the padding graph's node or
  edge that jraph's padding always adds.

  Raises:
    ValueError: if `count` is negative or `minimum` is not positive.
  """
  if count < 0:
    raise ValueError(f"count must be >= 0, got {count}.")
  if minimum <= 0:
    raise ValueError(f"minimum bucket size must be > 0, got {minimum}.")
  k = 0
  while True:
    size = _align(minimum * BUCKET_GROWTH**k)
    if size >= count + 1:
      return size
    k += 1


def _align(size: float) -> int:
  """Round `size` up to a multiple of `BUCKET_ALIGNMENT`."""
  # Rounding first keeps float error from pushing 512.0000001 up to 520.
  return int(math.ceil(round(size, 6) / BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT)


def pad_graphs(
  graphs: jraph.GraphsTuple,
  num_nodes: int | None = None,
  num_edges: int | None = None,
  num_graphs: int | None = None,
) -> jraph.GraphsTuple:
  """Pad a batch with a padding graph up to fixed sizes.

  Sizes that are not given are taken from the buckets (`bucket_size` with
  `MIN_NODE_BUCKET` and `MIN_EDGE_BUCKET`), and the number of graphs becomes
  the batch's plus one. Padding nodes and edges belong to the extra graphs;
  `jraph.get_node_padding_mask` and friends recover the masks. Padding edges
  are self-loops on the first padding node with weight
  `PADDING_EDGE_WEIGHT`.

  Args:
    graphs: the batch, as returned by `batch_graphs` or
      `graph_to_graphs_tuple`.
    num_nodes: total nodes after padding; must exceed the batch's nodes.
    num_edges: total edges after padding; at least the batch's edges.
    num_graphs: total graphs after padding; must exceed the batch's graphs.

  Returns:
    The padded `GraphsTuple` (NumPy arrays).

  Raises:
    ValueError: if a requested size is too small for the batch.
  """
  real_nodes = int(np.sum(graphs.n_node))
  real_edges = int(np.sum(graphs.n_edge))
  real_graphs = int(graphs.n_node.shape[0])
  if num_nodes is None:
    num_nodes = bucket_size(real_nodes, MIN_NODE_BUCKET)
  if num_edges is None:
    num_edges = bucket_size(real_edges, MIN_EDGE_BUCKET)
  if num_graphs is None:
    num_graphs = real_graphs + 1
  if num_nodes <= real_nodes:
    raise ValueError(
      f"num_nodes={num_nodes} must exceed the batch's {real_nodes} nodes "
      "(one padding node at least)."
    )
  if num_edges < real_edges:
    raise ValueError(
      f"num_edges={num_edges} is below the batch's {real_edges} edges."
    )
  if num_graphs <= real_graphs:
    raise ValueError(
      f"num_graphs={num_graphs} must exceed the batch's {real_graphs} graphs."
    )
  padded = jraph.pad_with_graphs(graphs, num_nodes, num_edges, num_graphs)
  weight = np.array(padded.edges["weight"])
  weight[real_edges:] = PADDING_EDGE_WEIGHT
  edges = dict(padded.edges)
  edges["weight"] = weight
  return padded._replace(
    edges=edges,
    n_node=padded.n_node.astype(np.int32),
    n_edge=padded.n_edge.astype(np.int32),
    senders=padded.senders.astype(np.int32),
    receivers=padded.receivers.astype(np.int32),
  )


def graphs_to_padded_batch(
  graphs: Sequence[graph_lib.Graph],
  cutoff: int = graph_lib.DEFAULT_VIRTUAL_EDGE_CUTOFF,
  num_nodes: int | None = None,
  num_edges: int | None = None,
  num_graphs: int | None = None,
) -> jraph.GraphsTuple:
  """Convert, batch and pad several graphs in one call.

  Args:
    graphs: computational graphs, one per network.
    cutoff: maximum shortest-path length of a virtual edge.
    num_nodes: see `pad_graphs`; bucketed when None.
    num_edges: see `pad_graphs`; bucketed when None.
    num_graphs: see `pad_graphs`; `len(graphs) + 1` when None.

  Returns:
    The padded `GraphsTuple`; graph i of the batch is network i.
  """
  tuples = [graph_to_graphs_tuple(g, cutoff) for g in graphs]
  return pad_graphs(batch_graphs(tuples), num_nodes, num_edges, num_graphs)


def node_padding_mask(graphs: jraph.GraphsTuple) -> np.ndarray:
  """Return a bool (N,) mask, True for the nodes of real graphs."""
  num_padding = int(jraph.get_number_of_padding_with_graphs_nodes(graphs))
  mask = np.ones(int(np.sum(graphs.n_node)), bool)
  mask[mask.size - num_padding :] = False
  return mask


def edge_padding_mask(graphs: jraph.GraphsTuple) -> np.ndarray:
  """Return a bool (E,) mask, True for the edges of real graphs."""
  num_padding = int(jraph.get_number_of_padding_with_graphs_edges(graphs))
  mask = np.ones(int(np.sum(graphs.n_edge)), bool)
  mask[mask.size - num_padding :] = False
  return mask


def node_graph_index(graphs: jraph.GraphsTuple) -> np.ndarray:
  """Return int32 (N,), the index of the graph each node belongs to."""
  n_node = np.asarray(graphs.n_node)
  return np.repeat(np.arange(n_node.size, dtype=np.int32), n_node)
