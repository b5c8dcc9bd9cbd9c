"""Computational graphs of networks, as read by a graph hypernetwork.

A `Graph` describes one network: one node per operation, typed by one of the 15
GHN-2 primitives, real edges along the data flow, and for each node that owns
a parameter the path of that parameter in the network's Flax params pytree.
Shapes are stored in the layout the GHN predicts in (PyTorch's: out, in, h,
w), and `node_param_perm` says how to transpose a prediction into the Flax
layout of the parameter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

# Op types in the index order of the original GHN-2 (its `primitives` list);
# the GHN's op embedding table is indexed by this order.
PRIMITIVES = (
  "max_pool",
  "avg_pool",
  "sep_conv",
  "dil_conv",
  "conv",
  "msa",
  "cse",
  "sum",
  "concat",
  "input",
  "bias",
  "bn",
  "ln",
  "pos_enc",
  "glob_avg",
)
PRIMITIVE_INDEX = {name: i for i, name in enumerate(PRIMITIVES)}

# Shortest-path distance up to which virtual edges are added (GHN-2 paper,
# Eq. 4, and the value its CIFAR-10 and ImageNet models were trained with).
DEFAULT_VIRTUAL_EDGE_CUTOFF = 50


@dataclasses.dataclass(frozen=True)
class Graph:
  """One network's computational graph, nodes in a topological order.

  Attributes:
    node_ops: int32 (N,), op type of each node, an index into `PRIMITIVES`.
    node_shapes: int64 (N, 4), shape attached to each node in GHN layout
      (out, in, h, w), left-aligned and padded with 0; all zeros for nodes
      without a shape. Parameter nodes carry the parameter's shape, pooling
      nodes (1, 1, k, k).
    node_params: path of the parameter predicted from each node in the
      params pytree, keys joined by '/', or '' for nodes that predict none.
    node_extra_params: for norm-layer scale nodes, the path of the norm's
      bias, which the GHN predicts from the same node; '' otherwise.
    node_param_perm: int32 (N, 4), axes permutation that turns a prediction
      in GHN layout into the Flax layout of the parameter (only the first
      ndim entries are used).
    senders: int32 (E,), source node of each real edge.
    receivers: int32 (E,), target node of each real edge.
    node_names: human-readable name of each node (informational).
  """

  node_ops: np.ndarray
  node_shapes: np.ndarray
  node_params: tuple[str, ...]
  node_extra_params: tuple[str, ...]
  node_param_perm: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  node_names: tuple[str, ...] = ()

  @property
  def num_nodes(self) -> int:
    return int(self.node_ops.shape[0])

  @property
  def num_edges(self) -> int:
    return int(self.senders.shape[0])

  def validate(self) -> None:
    """Check that the arrays agree in length and the edges are in range.

    Raises:
      ValueError: if a field has the wrong shape, an edge index is out of
        range, or an edge is a self-loop.
    """
    n = self.num_nodes
    per_node = {
      "node_shapes": np.shape(self.node_shapes),
      "node_param_perm": np.shape(self.node_param_perm),
    }
    for name, shape in per_node.items():
      if shape != (n, 4):
        raise ValueError(f"{name} has shape {shape}, expected ({n}, 4).")
    for name in ("node_params", "node_extra_params"):
      if len(getattr(self, name)) != n:
        raise ValueError(
          f"{name} has {len(getattr(self, name))} entries for {n} nodes."
        )
    if self.node_names and len(self.node_names) != n:
      raise ValueError(
        f"node_names has {len(self.node_names)} entries for {n} nodes."
      )
    _check_edges(self.senders, self.receivers, n)


def _check_edges(senders: np.ndarray, receivers: np.ndarray, num_nodes: int):
  """Raise ValueError unless the edges are valid indices without loops."""
  senders = np.asarray(senders)
  receivers = np.asarray(receivers)
  if senders.shape != receivers.shape or senders.ndim != 1:
    raise ValueError(
      f"senders {senders.shape} and receivers {receivers.shape} must be 1-D "
      "arrays of the same length."
    )
  if senders.size == 0:
    return
  low = min(senders.min(), receivers.min())
  high = max(senders.max(), receivers.max())
  if low < 0 or high >= num_nodes:
    raise ValueError(
      f"edge node indices span [{low}, {high}], outside [0, {num_nodes})."
    )
  loops = np.flatnonzero(senders == receivers)
  if loops.size:
    raise ValueError(
      f"the graph has self-loops at nodes {senders[loops][:10].tolist()}; "
      "a computational graph must be acyclic."
    )


def virtual_edges(
  senders: np.ndarray,
  receivers: np.ndarray,
  num_nodes: int,
  cutoff: int = DEFAULT_VIRTUAL_EDGE_CUTOFF,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Add virtual edges between nodes joined by a short directed path.

  Follows Eq. 4 of the GHN-2 paper (Knyazev et al., 2021): every pair (s, r)
  with a directed path from s to r of length d <= `cutoff` gets an edge of
  weight d. Real edges are the pairs with d = 1, so they keep weight 1. The
  shortest paths come from `scipy.sparse.csgraph.dijkstra` on the unweighted
  graph, searched no further than `cutoff`.

  Args:
    senders: int (E,), source node of each real edge.
    receivers: int (E,), target node of each real edge.
    num_nodes: number of nodes in the graph.
    cutoff: maximum shortest-path length that gets an edge; a value below 2
      returns the real edges only (deduplicated).

  Returns:
    `(senders, receivers, weight)`, int32 arrays sorted by (sender,
    receiver); `weight` is the shortest-path length of each pair.

  Raises:
    ValueError: if `num_nodes` or `cutoff` is negative, an edge index is out
      of range, or the graph has a self-loop.
  """
  if num_nodes < 0:
    raise ValueError(f"num_nodes must be >= 0, got {num_nodes}.")
  if cutoff < 0:
    raise ValueError(f"cutoff must be >= 0, got {cutoff}.")
  senders = np.asarray(senders, dtype=np.int64)
  receivers = np.asarray(receivers, dtype=np.int64)
  _check_edges(senders, receivers, num_nodes)
  if senders.size == 0:
    empty = np.zeros(0, np.int32)
    return empty, empty.copy(), empty.copy()

  adjacency = scipy.sparse.csr_matrix(
    (np.ones(senders.size, np.float64), (senders, receivers)),
    shape=(num_nodes, num_nodes),
  )
  if cutoff < 2:
    # Summing duplicates and reading the pattern back deduplicates the edges.
    adjacency.sum_duplicates()
    coo = adjacency.tocoo()
    order = np.lexsort((coo.col, coo.row))
    rows = coo.row[order].astype(np.int32)
    cols = coo.col[order].astype(np.int32)
    return rows, cols, np.ones(rows.size, np.int32)

  distances = scipy.sparse.csgraph.dijkstra(
    adjacency, directed=True, unweighted=True, limit=cutoff
  )
  np.fill_diagonal(distances, np.inf)
  rows, cols = np.nonzero(np.isfinite(distances))
  weight = distances[rows, cols].astype(np.int32)
  return rows.astype(np.int32), cols.astype(np.int32), weight


_ARRAY_FIELDS = (
  "node_ops",
  "node_shapes",
  "node_param_perm",
  "senders",
  "receivers",
)
_STRING_FIELDS = ("node_params", "node_extra_params", "node_names")


def save_graph(path: str, graph: Graph) -> None:
  """Write a graph to an `.npz` file (strings as unicode arrays, no pickle)."""
  graph.validate()
  arrays = {name: np.asarray(getattr(graph, name)) for name in _ARRAY_FIELDS}
  for name in _STRING_FIELDS:
    arrays[name] = np.asarray(getattr(graph, name), dtype=np.str_)
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)


def load_graph(path: str) -> Graph:
  """Read a graph written by `save_graph`.

  Raises:
    ValueError: if the file lacks a field of `Graph` or fails validation.
  """
  with np.load(path, allow_pickle=False) as data:
    missing = [
      name for name in _ARRAY_FIELDS + _STRING_FIELDS if name not in data
    ]
    if missing:
      raise ValueError(f"{path} is not a saved Graph: missing {missing}.")
    fields = {name: data[name] for name in _ARRAY_FIELDS}
    for name in _STRING_FIELDS:
      fields[name] = tuple(str(s) for s in data[name])
  graph = Graph(
    node_ops=fields["node_ops"].astype(np.int32),
    node_shapes=fields["node_shapes"].astype(np.int64).reshape(-1, 4),
    node_params=fields["node_params"],
    node_extra_params=fields["node_extra_params"],
    node_param_perm=fields["node_param_perm"].astype(np.int32).reshape(-1, 4),
    senders=fields["senders"].astype(np.int32),
    receivers=fields["receivers"].astype(np.int32),
    node_names=fields["node_names"],
  )
  graph.validate()
  return graph
