"""Host-side inputs of the GHN: shape lookup, sweep schedule, decoding plan.

Everything here is NumPy and runs once per batch of graphs before the jitted
GHN (`ghn_jax.ghn`). It turns graphs into fixed-size padded arrays:

* shape-encoder indices (the lookup rules of the original GHN-2, ppuda
  commit 4673a42, `ppuda/ghn/layers.py`);
* a sweep schedule: nodes grouped by topological depth level, and per level
  the padded table of each node's incoming (forward sweep) and outgoing
  (backward sweep) edges. No edge, real or virtual, joins two nodes of the
  same level, so updating a whole level at once gives the same result as the
  node-by-node sweeps of the GHN-2 paper (Eq. 3-4);
* a decoding plan: which node embeddings go through which decoder, at which
  kernel positions and for how many channels, and how each decoded block is
  cropped, tiled and transposed into a parameter of the target network.

Array sizes are rounded up to buckets, so the jitted GHN compiles once per
bucket signature rather than once per architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from ghn_jax import graph as graph_lib

NUM_OPS = len(graph_lib.PRIMITIVES)
MAX_TENSOR_DIMS = 4

# Spatial sizes, channel steps and special cases of the GHN-2 shape encoder.
_SPATIAL_EXTRA = (14, 16)
_MIN_SPATIAL_RANGE_END = 12
_CHANNEL_STEPS = (2**3, 2**6, 2**12, 2**13)
_CHANNEL_STRIDES = (2**3, 2**4, 2**5)
_SMALL_CHANNELS = (1, 3)
# Channel counts in [4, 8) use the entry of 8, spatial size 2 the entry of 3.
_SMALL_CHANNEL_RANGE = (4, 8)
_SPATIAL_TWO, _SPATIAL_TWO_AS = 2, 3
_MAX_LOGGED_SIZES = 10

# Fan-in normalisation of predicted tensors (GHN-2 paper, Sec. 4): gain 2
# for layers followed by ReLU, 1 for depthwise or (k_h < k_w) kernels.
_RELU_GAIN, _LINEAR_GAIN = 2.0, 1.0
# A 4-D tensor with one output channel and a kernel at least this large is a
# positional encoding, which the original leaves unnormalised.
POS_ENC_MIN_SIZE = 11

# Candidate channel counts of a decoded block; the block is the smallest
# candidate that covers the channels a tensor needs (plus the maximum).
_BLOCK_CHANNELS = (1, 4, 16)

# Bucket sizes grow by this factor from a minimum (rounded up to integers).
_BUCKET_GROWTH = math.sqrt(2.0)
_MIN_NODES, _MIN_LEVELS, _MIN_POSITIONS, _MIN_SLOTS = 16, 8, 8, 1

VECTOR, CLASS_BIAS, CLASS_WEIGHT, CONV = (
  "vector",
  "class_bias",
  "class_weight",
  "conv",
)


@dataclasses.dataclass(frozen=True)
class GraphSpec:
  """One graph as the GHN reads it (virtual edges included).

  Attributes:
    node_ops: int (N,), op index into `graph.PRIMITIVES`.
    node_shapes: int (N, 4), shape attached to each node in GHN layout
      (out, in, h, w), 0-padded; all zeros for nodes without a shape.
    senders: int (E,), source of each edge.
    receivers: int (E,), target of each edge.
    edge_weight: int (E,), 1 for real edges, the shortest-path length d >= 2
      for virtual edges.
    node_params: path of the parameter predicted from each node ('' if
      none), keys joined by '/'.
    node_extra_params: path of the norm bias predicted from a norm-scale
      node ('' if none).
    node_param_perm: int (N, 4), axes permutation from GHN layout to the
      layout of the parameter (first ndim entries used).
    node_is_bias: bool (N,), whether the node's parameter is a bias (takes
      the bias row of the 1-D decoder and the bias normalisation).
  """

  node_ops: np.ndarray
  node_shapes: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  edge_weight: np.ndarray
  node_params: tuple[str, ...]
  node_extra_params: tuple[str, ...]
  node_param_perm: np.ndarray
  node_is_bias: np.ndarray

  @property
  def num_nodes(self) -> int:
    return int(np.shape(self.node_ops)[0])


def spec_from_graph(
  graph: graph_lib.Graph,
  cutoff: int = graph_lib.DEFAULT_VIRTUAL_EDGE_CUTOFF,
) -> GraphSpec:
  """Build the GHN input of a `Graph`, adding virtual edges up to `cutoff`.

  Args:
    graph: computational graph, nodes in topological order.
    cutoff: maximum shortest-path length of a virtual edge (1: none).

  Returns:
    The `GraphSpec`; a node predicts a bias when its parameter path ends in
    `bias`.
  """
  graph.validate()
  senders, receivers, weight = graph_lib.virtual_edges(
    graph.senders, graph.receivers, graph.num_nodes, cutoff
  )
  is_bias = np.array(
    [p.split("/")[-1] == "bias" for p in graph.node_params], dtype=bool
  )
  return GraphSpec(
    node_ops=np.asarray(graph.node_ops, np.int64),
    node_shapes=np.asarray(graph.node_shapes, np.int64).reshape(-1, 4),
    senders=senders,
    receivers=receivers,
    edge_weight=weight,
    node_params=tuple(graph.node_params),
    node_extra_params=tuple(graph.node_extra_params),
    node_param_perm=np.asarray(graph.node_param_perm, np.int64),
    node_is_bias=is_bias,
  )


def spec_from_reference(arrays: Any) -> GraphSpec:
  """Build the GHN input from a reference test vector of the original.

  The reference arrays (`node_op_idx`, `node_shape`, `senders`, `receivers`,
  `edge_weight`, `node_target_shape`, `node_param_name`, ...) already hold
  virtual edges. Parameters keep the original's names and PyTorch layout
  (identity permutation), so predictions compare one to one.

  Args:
    arrays: mapping of array name to array, e.g. an opened `.npz` file.

  Returns:
    The `GraphSpec`.
  """
  names = tuple(str(s) for s in arrays["node_param_name"])
  extras = tuple(str(s) for s in arrays["node_param_name_extra"])
  num_nodes = len(names)
  return GraphSpec(
    node_ops=np.asarray(arrays["node_op_idx"], np.int64),
    node_shapes=np.asarray(arrays["node_shape"], np.int64),
    senders=np.asarray(arrays["senders"], np.int64),
    receivers=np.asarray(arrays["receivers"], np.int64),
    edge_weight=np.asarray(arrays["edge_weight"], np.int64),
    node_params=names,
    node_extra_params=extras,
    node_param_perm=np.tile(np.arange(4), (num_nodes, 1)),
    node_is_bias=np.array([n.endswith(".bias") for n in names], dtype=bool),
  )


# ---------------------------------------------------------------------------
# Shape encoder lookup.


def shape_tables(
  num_classes: int, max_kernel: int
) -> tuple[np.ndarray, np.ndarray]:
  """Return the channel and spatial size tables of the shape encoder."""
  lo, mid, hi, top = _CHANNEL_STEPS
  channels = np.unique(
    list(_SMALL_CHANNELS)
    + [num_classes]
    + list(range(lo, mid, _CHANNEL_STRIDES[0]))
    + list(range(mid, hi, _CHANNEL_STRIDES[1]))
    + list(range(hi, top + 1, _CHANNEL_STRIDES[2]))
  )
  spatial = np.unique(
    list(range(1, max(_MIN_SPATIAL_RANGE_END, max_kernel), 2))
    + list(_SPATIAL_EXTRA)
  )
  return channels, spatial


def _nearest_index(table: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Index of the nearest table entry (ties go to the smaller entry)."""
  right = np.clip(np.searchsorted(table, values), 1, len(table) - 1)
  left = right - 1
  take_right = (table[right] - values) < (values - table[left])
  return np.where(take_right, right, left)


def _lookup(
  table: np.ndarray, values: np.ndarray, special: tuple[np.ndarray, int]
) -> np.ndarray:
  """Apply the original's lookup: exact, special cases, nearest, else last."""
  values = np.asarray(values, np.int64)
  index = _nearest_index(table, values)
  exact = np.isin(values, table)
  index = np.where(exact, np.searchsorted(table, values), index)
  # The special cases override even exact entries, as in the original.
  special_mask, special_value = special
  special_index = int(np.searchsorted(table, special_value))
  index = np.where(special_mask, special_index, index)
  # Values outside [1, table[-1]) that are not in the table use the last
  # entry (the original's fallback for sizes it never saw in training).
  outside = (values < 1) | (values >= table[-1])
  return np.where(outside & ~exact, len(table) - 1, index)


def shape_to_4d(shape: Sequence[int]) -> tuple[int, int, int, int]:
  """Make a tensor shape 4-D the way the GHN-2 shape encoder does.

  (a,) -> (a, 1, 1, 1); (a, b) -> (a, b, 1, 1); a 3-D (1, t, c) shape with
  t, c > 1 (a token table such as ViT's positional embedding) becomes
  (1, c, s, s) with s = floor(sqrt(t)), other 3-D shapes (a, b, c, 1).

  Raises:
    ValueError: if the shape has more than 4 or no dimensions.
  """
  shape = tuple(int(s) for s in shape)
  if not 1 <= len(shape) <= MAX_TENSOR_DIMS:
    raise ValueError(
      f"tensor shape {shape} has {len(shape)} dimensions; the GHN encodes "
      f"shapes of 1 to {MAX_TENSOR_DIMS} dimensions only."
    )
  if len(shape) == 1:
    return (shape[0], 1, 1, 1)
  if len(shape) == 2:
    return (shape[0], shape[1], 1, 1)
  if len(shape) == 3:
    if shape[0] == 1 and min(shape[1:]) > 1:
      side = math.isqrt(shape[1])
      return (1, shape[2], side, side)
    return (shape[0], shape[1], shape[2], 1)
  return shape  # type: ignore[return-value]


def shape_ndims(node_shapes: np.ndarray) -> np.ndarray:
  """Number of leading nonzero entries of each 0-padded (N, 4) shape."""
  nonzero = np.asarray(node_shapes) > 0
  return np.cumprod(nonzero, axis=1).sum(axis=1)


def _warn_unseen_sizes(
  shapes4: np.ndarray,
  index: np.ndarray,
  channels: np.ndarray,
  spatial: np.ndarray,
) -> None:
  """Log sizes that the shape encoder replaces by another table entry."""
  used = np.concatenate([channels[index[:, :2]], spatial[index[:, 2:]]], axis=1)
  changed = shapes4 != used
  if changed.any():
    pairs = sorted(
      {
        (int(a), int(b))
        for a, b in zip(shapes4[changed], used[changed], strict=True)
      }
    )
    logging.warning(
      "%d shape sizes are not in the shape encoder's tables and use the "
      "nearest (or last) entry instead, as in the original GHN-2: "
      "(size, entry used) %s",
      len(pairs),
      pairs[:_MAX_LOGGED_SIZES],
    )


def shape_indices(
  node_shapes: np.ndarray, num_classes: int, max_kernel: int
) -> np.ndarray:
  """Look up the shape-encoder indices of 0-padded (N, 4) node shapes.

  Channel sizes map to their entry, 4..7 to the entry of 8, other sizes
  below the last entry (8192) to the nearest one (ties to the smaller), and
  larger ones to the last entry; spatial sizes likewise, with 2 -> 3. Nodes
  without a shape get the dummy indices (one past each table).

  Returns:
    int32 (N, 4): out-channel, in-channel, height and width indices.

  Raises:
    ValueError: if `node_shapes` is not (N, 4) or has negative sizes.
  """
  node_shapes = np.asarray(node_shapes, np.int64)
  if node_shapes.ndim != 2 or node_shapes.shape[1] != MAX_TENSOR_DIMS:
    raise ValueError(
      f"node shapes must be an (N, {MAX_TENSOR_DIMS}) array, got "
      f"{node_shapes.shape}; tensors with more than {MAX_TENSOR_DIMS} "
      "dimensions are not supported."
    )
  if (node_shapes < 0).any():
    raise ValueError("node shapes must be >= 0 (0 pads missing dimensions).")
  channels, spatial = shape_tables(num_classes, max_kernel)
  ndims = shape_ndims(node_shapes)
  # Padding zeros become 1 (shape_to_4d for 1-D, 2-D and 4-D shapes); only
  # 3-D shapes need their special rule.
  shapes4 = np.where(node_shapes > 0, node_shapes, 1)
  for i in np.flatnonzero(ndims == 3):
    shapes4[i] = shape_to_4d(node_shapes[i, :3])
  out = np.empty_like(node_shapes)
  for axis in range(2):
    small = (shapes4[:, axis] >= _SMALL_CHANNEL_RANGE[0]) & (
      shapes4[:, axis] < _SMALL_CHANNEL_RANGE[1]
    )
    out[:, axis] = _lookup(
      channels, shapes4[:, axis], (small, _SMALL_CHANNEL_RANGE[1])
    )
  for axis in range(2, 4):
    two = shapes4[:, axis] == _SPATIAL_TWO
    out[:, axis] = _lookup(spatial, shapes4[:, axis], (two, _SPATIAL_TWO_AS))
  _warn_unseen_sizes(shapes4[ndims > 0], out[ndims > 0], channels, spatial)
  dummy = np.array(
    [len(channels), len(channels), len(spatial), len(spatial)], np.int64
  )
  out[ndims == 0] = dummy
  return out.astype(np.int32)


# ---------------------------------------------------------------------------
# Padded batch and decoding plan.


def bucket(count: int, minimum: int) -> int:
  """Return the smallest bucket size >= count (minimum * sqrt(2)**k)."""
  size = float(minimum)
  while math.ceil(size - 1e-6) < count:
    size *= _BUCKET_GROWTH
  return int(math.ceil(size - 1e-6))


@dataclasses.dataclass(frozen=True)
class DecoderSizes:
  """Sizes of the decoders that the decoding plan depends on."""

  max_shape: tuple[int, int, int, int]
  num_classes: int
  weight_norm: bool
  virtual_edges: bool

  def block_sizes(self, axis: int) -> tuple[int, ...]:
    """Channel counts of decoded blocks along axis 0 (out) or 1 (in)."""
    limit = self.max_shape[axis]
    return tuple(sorted({c for c in _BLOCK_CHANNELS if c < limit} | {limit}))


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """Recipe for reading one predicted tensor out of the decoder outputs.

  Attributes:
    path: parameter path ('/'-joined).
    kind: `vector`, `class_bias`, `class_weight` or `conv`.
    index: node (vector), classifier slot (class_*) or first kernel
      position (conv) in the batch's decoder output.
    row: row of the 1-D decoders (0 weight, 1 bias).
    block: conv block name (`"{out}x{in}"`), '' for other kinds.
    kernel: decoded kernel size (at most the decoder's), conv only.
    channels: decoded (out, in) channels, conv only.
    shape: target shape in GHN layout.
    perm: axes permutation from GHN layout to the parameter's layout.
  """

  path: str
  kind: str
  index: int
  row: int
  block: str
  kernel: tuple[int, int]
  channels: tuple[int, int]
  shape: tuple[int, ...]
  perm: tuple[int, ...]


def block_name(out_channels: int, in_channels: int) -> str:
  return f"{out_channels}x{in_channels}"


def _fan_in_scale(shape: tuple[int, ...], sizes: DecoderSizes) -> float:
  """Fan-in normalisation factor of a predicted 2-D or 4-D tensor."""
  if not sizes.weight_norm:
    return 1.0
  if len(shape) == 4 and shape[0] == 1 and shape[2] >= POS_ENC_MIN_SIZE:
    return 1.0
  depthwise_like = len(shape) == 4 and (shape[1] == 1 or shape[2] < shape[3])
  gain = _LINEAR_GAIN if depthwise_like else _RELU_GAIN
  return math.sqrt(gain / int(np.prod(shape[1:])))


def _smallest_block(need: int, blocks: tuple[int, ...]) -> int:
  return next(b for b in blocks if b >= need)


@functools.cache
def _kernel_positions(kh: int, kw: int) -> np.ndarray:
  """Rows (0, y, x) for every position of a kh x kw kernel, row-major."""
  ys, xs = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
  return np.stack([np.zeros(kh * kw, np.int64), ys.ravel(), xs.ravel()], 1)


@dataclasses.dataclass
class _PlanBuilder:
  """Accumulate decoder positions and tensor plans over a batch of graphs."""

  sizes: DecoderSizes
  # Per block: arrays of (fc slot, y, x) kernel positions and their scales.
  positions: dict[str, list[tuple[np.ndarray, np.ndarray]]] = dataclasses.field(
    default_factory=dict
  )
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  class_bias: list[int] = dataclasses.field(default_factory=list)
  class_weight: list[tuple[int, float]] = dataclasses.field(
    default_factory=list
  )
  fc_nodes: dict[int, int] = dataclasses.field(default_factory=dict)

  def fc_slot(self, node: int) -> int:
    return self.fc_nodes.setdefault(node, len(self.fc_nodes))

  def add_conv(self, node: int, shape: tuple[int, ...]) -> tuple:
    """Register the kernel positions of a 2-D or 4-D tensor."""
    max_out, max_in, max_kh, max_kw = self.sizes.max_shape
    # NOTE: channel (o, i) of the decoder output is read at o * max_in + i
    # for every tensor; the original's sliced decoder path computes the same
    # entries when max_in is a multiple of the needed input channels and
    # raises otherwise (e.g. 20 input channels). Kernels larger than the
    # decoder's are tiled periodically, where the original tiles 2x2 only
    # when both kernel sides exceed it in that path and raises elsewhere.
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    kh, kw = min(kh, max_kh), min(kw, max_kw)
    need = (min(shape[0], max_out), min(shape[1], max_in))
    block = block_name(
      _smallest_block(need[0], self.sizes.block_sizes(0)),
      _smallest_block(need[1], self.sizes.block_sizes(1)),
    )
    start = self.counts.get(block, 0)
    self.counts[block] = start + kh * kw
    table = _kernel_positions(kh, kw).copy()
    table[:, 0] = self.fc_slot(node)
    scale = np.full(kh * kw, _fan_in_scale(shape, self.sizes), np.float32)
    self.positions.setdefault(block, []).append((table, scale))
    return block, start, (kh, kw), need


def _check_spec(spec: GraphSpec) -> None:
  """Raise ValueError for malformed graph inputs."""
  n = spec.num_nodes
  ops = np.asarray(spec.node_ops)
  if n == 0:
    raise ValueError("the graph has no nodes; the GHN needs at least one.")

  if ops.shape != (n,):
    raise ValueError(f"node_ops has shape {ops.shape}, expected ({n},).")
  bad = np.flatnonzero((ops < 0) | (ops >= NUM_OPS))
  if bad.size:
    raise ValueError(
      f"unknown op index {int(ops[bad[0]])} at node {int(bad[0])}: op "
      f"indices must be in [0, {NUM_OPS}) (see ghn_jax.graph.PRIMITIVES)."
    )
  if np.shape(spec.node_shapes) != (n, MAX_TENSOR_DIMS):
    raise ValueError(
      f"node_shapes has shape {np.shape(spec.node_shapes)}, expected "
      f"({n}, {MAX_TENSOR_DIMS}); tensors with more than "
      f"{MAX_TENSOR_DIMS} dimensions are not supported."
    )

  for name in ("node_params", "node_extra_params"):
    if len(getattr(spec, name)) != n:
      raise ValueError(
        f"{name} has {len(getattr(spec, name))} entries, not {n}"
      )

  senders, receivers = np.asarray(spec.senders), np.asarray(spec.receivers)
  weight = np.asarray(spec.edge_weight)
  if not senders.shape == receivers.shape == weight.shape:
    raise ValueError(
      f"senders {senders.shape}, receivers {receivers.shape} and edge "
      f"weights {weight.shape} must have the same length."
    )

  if senders.size:
    if senders.min() < 0 or receivers.max() >= n:
      raise ValueError(f"edge node indices must be in [0, {n}).")
    backward = np.flatnonzero(senders >= receivers)
    if backward.size:
      e = int(backward[0])
      raise ValueError(
        f"edge {int(senders[e])} -> {int(receivers[e])} does not go from an "
        "earlier to a later node; nodes must be in topological order."
      )
    if weight.min() < 1:
      raise ValueError("edge weights must be >= 1 (1 marks a real edge).")


def _node_levels(spec: GraphSpec) -> np.ndarray:
  """Topological depth of each node (longest real-edge path from a source).

  Virtual edges follow real paths, so they also go from lower to higher
  levels.
  """
  n = spec.num_nodes
  real = np.asarray(spec.edge_weight) == 1
  senders = np.asarray(spec.senders)[real]
  receivers = np.asarray(spec.receivers)[real]
  order = np.argsort(receivers, kind="stable")
  senders, receivers = senders[order], receivers[order]
  starts = np.searchsorted(receivers, np.arange(n + 1))
  levels = np.zeros(n, np.int64)
  for v in range(n):
    lo, hi = starts[v], starts[v + 1]
    if hi > lo:
      levels[v] = levels[senders[lo:hi]].max() + 1
  return levels


def _edge_table(
  step: np.ndarray,
  target_slot: np.ndarray,
  source: np.ndarray,
  weight: np.ndarray,
  num_steps: int,
  virtual_edges: bool,
) -> dict[str, np.ndarray]:
  """Pad the edges read at each sweep step into (steps, edges) tables.

  Each edge carries its source node, the position of its target within the
  step's node list, and two coefficients: 1 for a real edge (message MLP)
  and 1 / weight for every edge (virtual-edge MLP, GHN-2 paper, Eq. 4).
  Padding entries have zero coefficients.
  """
  counts = np.bincount(step, minlength=num_steps)
  size = bucket(max(int(counts.max(initial=0)), 1), _MIN_POSITIONS)
  sources = np.zeros((num_steps, size), np.int32)
  targets = np.zeros((num_steps, size), np.int32)
  coef = np.zeros((num_steps, size, 2), np.float32)
  order = np.argsort(step, kind="stable")
  step = step[order]
  rank = np.arange(step.size) - np.searchsorted(step, step, side="left")
  sources[step, rank] = source[order]
  targets[step, rank] = target_slot[order]
  coef[step, rank, 0] = weight[order] == 1
  if virtual_edges:
    coef[step, rank, 1] = 1.0 / weight[order].astype(np.float32)
  return {
    "sweep_sources": sources,
    "sweep_targets": targets,
    "sweep_coef": coef,
  }


def prepare_batch(
  specs: Sequence[GraphSpec], sizes: DecoderSizes, num_classes: int
) -> tuple[dict[str, Any], list[list[TensorPlan]]]:
  """Pad a batch of graphs into GHN inputs and plan the decoding.

  Args:
    specs: graphs of the batch (nodes concatenated in this order).
    sizes: decoder sizes of the GHN.
    num_classes: number of classes the shape encoder's table includes.

  Returns:
    `(inputs, plans)`: a dict of NumPy arrays (bucketed sizes; see
    `ghn_jax.ghn.GHN`), and for each graph the list of `TensorPlan`s.

  Raises:
    ValueError: for malformed graphs (see `GraphSpec`) or parameters of an
      unsupported rank.
  """
  if not specs:
    raise ValueError("the batch has no graphs; pass at least one.")
  for spec in specs:
    _check_spec(spec)
  counts = [s.num_nodes for s in specs]
  offsets = np.concatenate([[0], np.cumsum(counts)])
  total = int(offsets[-1])
  num_nodes = bucket(total, _MIN_NODES)

  ops = np.zeros(num_nodes, np.int32)
  shapes = np.zeros((num_nodes, MAX_TENSOR_DIMS), np.int64)
  levels = np.zeros(total, np.int64)
  edges = []
  for spec, off in zip(specs, offsets, strict=False):
    n = spec.num_nodes
    ops[off : off + n] = spec.node_ops
    shapes[off : off + n] = spec.node_shapes
    levels[off : off + n] = _node_levels(spec)
    keep = slice(None)
    if not sizes.virtual_edges:
      keep = np.asarray(spec.edge_weight) == 1
    edges.append(
      (
        np.asarray(spec.senders)[keep] + off,
        np.asarray(spec.receivers)[keep] + off,
        np.asarray(spec.edge_weight)[keep],
      )
    )
  senders = np.concatenate([e[0] for e in edges]).astype(np.int64)
  receivers = np.concatenate([e[1] for e in edges]).astype(np.int64)
  weight = np.concatenate([e[2] for e in edges]).astype(np.int64)

  # Level schedule: slot (level, position in level) of every node.
  num_levels = int(levels.max()) + 1
  order = np.lexsort((np.arange(total), levels))
  level_sorted = levels[order]
  first = np.searchsorted(level_sorted, level_sorted, side="left")
  slot = np.zeros((total, 2), np.int64)
  slot[order, 0] = level_sorted
  slot[order, 1] = np.arange(total) - first
  width = int(np.bincount(levels).max())
  pad_levels = bucket(num_levels, _MIN_LEVELS)
  pad_width = bucket(width, _MIN_SLOTS)
  level_nodes = np.full((pad_levels, pad_width), num_nodes, np.int32)
  level_nodes[slot[:, 0], slot[:, 1]] = np.arange(total)

  # One schedule covers both sweeps, so the GHN runs them in a single scan.
  # Steps 0..L-1 update the levels in order and read incoming edges (the
  # forward sweep). Steps L..2L-1 update them in reverse order and read
  # outgoing edges (the backward sweep).
  forward_step = slot[receivers, 0]
  backward_step = 2 * pad_levels - 1 - slot[senders, 0]
  edge_tables = _edge_table(
    np.concatenate([forward_step, backward_step]),
    np.concatenate([slot[receivers, 1], slot[senders, 1]]),
    np.concatenate([senders, receivers]),
    np.concatenate([weight, weight]),
    2 * pad_levels,
    sizes.virtual_edges,
  )

  builder = _PlanBuilder(sizes)
  plans = [
    _plan_graph(spec, int(off), builder)
    for spec, off in zip(specs, offsets, strict=False)
  ]
  inputs = {
    "node_ops": ops,
    "shape_index": np.zeros((num_nodes, 4), np.int32),
    "sweep_nodes": np.concatenate([level_nodes, level_nodes[::-1]]),
    **edge_tables,
  }
  inputs["shape_index"][:] = shape_indices(
    shapes, num_classes, sizes.max_shape[3]
  )
  inputs.update(_decoder_inputs(builder, len(specs)))
  return inputs, plans


def _plan_graph(
  spec: GraphSpec, offset: int, builder: _PlanBuilder
) -> list[TensorPlan]:
  """Plan the tensors predicted from the nodes of one graph."""
  n = spec.num_nodes
  ndims = shape_ndims(spec.node_shapes)
  plans = []
  for v in range(n):
    path = spec.node_params[v]
    if not path:
      continue
    ndim = int(ndims[v])
    shape = tuple(int(s) for s in spec.node_shapes[v, :ndim])
    perm = tuple(int(p) for p in spec.node_param_perm[v, :ndim])
    node = offset + v
    common = dict(block="", kernel=(0, 0), channels=(0, 0))
    is_bias = bool(spec.node_is_bias[v])
    extra = spec.node_extra_params[v]
    if ndim == 1:
      # The original decodes the last node's 1-D tensor (the classifier
      # bias) through `bias_class`, every other one through `decoder_1d`.
      if v == n - 1:
        kind, index = CLASS_BIAS, len(builder.class_bias)
        builder.class_bias.append(node)
      else:
        kind, index = VECTOR, node
      plans.append(
        TensorPlan(
          path, kind, index, int(is_bias), shape=shape, perm=perm, **common
        )
      )
      if extra:
        plans.append(
          TensorPlan(extra, kind, index, 1, shape=shape, perm=(0,), **common)
        )
    elif ndim == 2 and v == n - 2:
      index = len(builder.class_weight)
      scale = _fan_in_scale(shape, builder.sizes)
      builder.class_weight.append((builder.fc_slot(node), scale))
      plans.append(
        TensorPlan(
          path, CLASS_WEIGHT, index, 0, shape=shape, perm=perm, **common
        )
      )
    elif ndim in (2, 4):
      block, start, kernel, need = builder.add_conv(node, shape)
      plans.append(
        TensorPlan(path, CONV, start, 0, block, kernel, need, shape, perm)
      )
    else:
      raise ValueError(
        f"parameter {path!r} has shape {shape}: the GHN predicts 1-D, 2-D "
        "and 4-D tensors only; reshape it in the network to one of those."
      )
  return plans


def _decoder_inputs(builder: _PlanBuilder, num_graphs: int) -> dict:
  """Padded arrays of decoder positions and classifier nodes."""
  fc_nodes = np.zeros(
    bucket(max(len(builder.fc_nodes), 1), _MIN_POSITIONS), np.int32
  )
  for node, slot in builder.fc_nodes.items():
    fc_nodes[slot] = node
  slots = bucket(num_graphs, _MIN_SLOTS)
  class_bias = np.zeros(slots, np.int32)
  class_bias[: len(builder.class_bias)] = builder.class_bias
  class_weight_fc = np.zeros(slots, np.int32)
  class_weight_scale = np.zeros(slots, np.float32)
  for i, (fc, scale) in enumerate(builder.class_weight):
    class_weight_fc[i], class_weight_scale[i] = fc, scale
  blocks = {}
  for name, entries in sorted(builder.positions.items()):
    used = builder.counts[name]
    count = bucket(used, _MIN_POSITIONS)
    table = np.zeros((count, 3), np.int32)
    scale = np.zeros(count, np.float32)
    table[:used] = np.concatenate([e[0] for e in entries])
    scale[:used] = np.concatenate([e[1] for e in entries])
    blocks[name] = {"position": table, "scale": scale}
  return {
    "fc_nodes": fc_nodes,
    "class_bias_nodes": class_bias,
    "class_weight_fc": class_weight_fc,
    "class_weight_scale": class_weight_scale,
    "blocks": blocks,
  }


# ---------------------------------------------------------------------------
# Assembly of predicted tensors.


def _tile_to(x: Any, shape: tuple[int, ...], xp: Any) -> Any:
  """Crop `x` to at most `shape`, then tile and crop it to exactly `shape`."""
  crop = tuple(slice(0, min(t, s)) for t, s in zip(shape, x.shape, strict=True))
  x = x[crop]
  reps = tuple(-(-t // s) for t, s in zip(shape, x.shape, strict=True))
  if any(r > 1 for r in reps):
    x = xp.tile(x, reps)
    x = x[tuple(slice(0, t) for t in shape)]
  return x


def assemble_tensor(outputs: dict, plan: TensorPlan, xp: Any = np) -> Any:
  """Cut, tile and transpose one predicted tensor out of decoder outputs.

  The small decoded block is transposed into the parameter's layout first
  and tiled afterwards, so the large result is written once, contiguously.

  Args:
    outputs: decoder outputs of `ghn_jax.ghn.GHN` (NumPy or JAX arrays).
    plan: the tensor's plan.
    xp: `numpy` or `jax.numpy`.

  Returns:
    The tensor in the parameter's layout (`plan.perm` applied).
  """
  if plan.kind == VECTOR:
    x = outputs["vector"][plan.index, plan.row]
  elif plan.kind == CLASS_BIAS:
    x = outputs["class_bias"][plan.index, plan.row]
  elif plan.kind == CLASS_WEIGHT:
    x = outputs["class_weight"][plan.index]
  else:
    kh, kw = plan.kernel
    out_ch, in_ch = plan.channels
    block = outputs["blocks"][plan.block]
    x = block[plan.index : plan.index + kh * kw]
    x = x.reshape(kh, kw, *x.shape[1:])[:, :, :out_ch, :in_ch]
    x = xp.transpose(x, (2, 3, 0, 1))
    if len(plan.shape) == 2:
      x = x[:, :, 0, 0]
  shape = plan.shape
  crop = tuple(slice(0, min(t, s)) for t, s in zip(shape, x.shape, strict=True))
  x = x[crop]
  if plan.perm != tuple(range(len(plan.perm))):
    x = xp.transpose(x, plan.perm)
    shape = tuple(shape[p] for p in plan.perm)
  return _tile_to(x, shape, xp)
