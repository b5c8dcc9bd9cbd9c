"""Computational graphs of networks, as read by a graph hypernetwork.

A `Graph` holds one network: one node per operation, typed by one of the 15
GHN-2 primitives, real edges along the data flow, and for each node that owns
a parameter the path of that parameter in the network's Flax params pytree.
Shapes are stored in the layout the GHN predicts in (PyTorch's: out, in, h,
w), and `node_param_perm` says how to transpose a prediction into the Flax
layout of the parameter.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
