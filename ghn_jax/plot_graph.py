"""Pictures of computational graphs (networkx + matplotlib, no graphviz).

Nodes are placed in layers along the data flow: a node's layer is the
length of the longest path from the input to it, so every edge points to
the right. Within a layer, nodes are sorted by the mean position of their
inputs (one barycentric sweep), which keeps parallel branches apart. Nodes
are coloured by GHN-2 primitive, with a legend, in the spirit of the GHN-2
paper's figures of ResNet-50 and DARTS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ghn_jax import graph as graph_lib

# One colour per primitive (tab20 colours, chosen so that frequent types
# differ strongly), and a marker per family of ops.
PRIMITIVE_COLORS = {
  "input": "#d62728",
  "conv": "#1f77b4",
  "sep_conv": "#17becf",
  "dil_conv": "#9edae5",
  "bn": "#2ca02c",
  "ln": "#bcbd22",
  "bias": "#e377c2",
  "sum": "#ff7f0e",
  "concat": "#8c564b",
  "max_pool": "#9467bd",
  "avg_pool": "#c5b0d5",
  "glob_avg": "#ffbb78",
  "msa": "#111111",
  "cse": "#7f7f7f",
  "pos_enc": "#f7b6d2",
}
PRIMITIVE_MARKERS = {
  "input": "s",
  "conv": "^",
  "sep_conv": "^",
  "dil_conv": "^",
  "bn": "s",
  "ln": "s",
  "bias": "d",
  "sum": "o",
  "concat": "h",
  "max_pool": "o",
  "avg_pool": "o",
  "glob_avg": "o",
  "msa": "*",
  "cse": "p",
  "pos_enc": "s",
}
# Layout spacing in data units, and figure inches per layer / per row.
_LAYER_GAP = 1.0
_ROW_GAP = 1.0
_INCHES_PER_LAYER = 0.22
_INCHES_PER_ROW = 0.5
_MIN_WIDTH, _MAX_WIDTH = 8.0, 60.0
_MIN_HEIGHT, _MAX_HEIGHT = 3.0, 30.0
# Curvature of edges that skip layers.
_ARC_RAD = -0.25


def node_depths(graph: graph_lib.Graph) -> np.ndarray:
  """Return each node's layer: the longest path length from a source.

  Sources other than the input (e.g. a positional encoding) are placed
  just before their first consumer.
  """
  n = graph.num_nodes
  depth = np.zeros(n, np.int64)
  has_input = np.zeros(n, bool)
  order = np.argsort(graph.senders, kind="stable")
  senders, receivers = graph.senders[order], graph.receivers[order]
  has_input[receivers] = True
  # Nodes are in a topological order, so one pass in node order suffices.
  incoming = [[] for _ in range(n)]
  for s, r in zip(senders.tolist(), receivers.tolist(), strict=True):
    incoming[r].append(s)
  for v in range(n):
    if incoming[v]:
      depth[v] = 1 + max(depth[u] for u in incoming[v])
  for v in range(1, n):
    consumers = receivers[senders == v]
    if not has_input[v] and consumers.size:
      depth[v] = max(depth[consumers].min() - 1, 0)
  return depth


def layered_layout(graph: graph_lib.Graph) -> dict[int, tuple[float, float]]:
  """Return node positions: x by layer, y by a barycentric order in layer."""
  depth = node_depths(graph)
  incoming: dict[int, list[int]] = {}
  for s, r in zip(
    graph.senders.tolist(), graph.receivers.tolist(), strict=True
  ):
    incoming.setdefault(r, []).append(s)
  y: dict[int, float] = {}
  for layer in range(int(depth.max(initial=0)) + 1):
    members = np.flatnonzero(depth == layer).tolist()
    wanted = {}
    for v in members:
      ys = [y[u] for u in incoming.get(v, []) if u in y]
      wanted[v] = float(np.mean(ys)) if ys else 0.0
    members.sort(key=lambda v, wanted=wanted: (wanted[v], v))
    offset = (len(members) - 1) / 2.0
    for rank, v in enumerate(members):
      # Near the inputs' mean, and at least a row apart within the layer.
      y[v] = (rank - offset) * _ROW_GAP + 0.5 * wanted[v]
  return {
    v: (float(depth[v]) * _LAYER_GAP, y[v]) for v in range(graph.num_nodes)
  }


def plot_graph(
  graph: graph_lib.Graph,
  path: str | None = None,
  title: str | None = None,
  node_size: float = 60.0,
  dpi: int = 120,
  figsize: tuple[float, float] | None = None,
) -> Figure:
  """Draw a graph with nodes coloured by primitive and a legend.

  Args:
    graph: the computational graph.
    path: if given, the figure is saved there (format from the extension,
      e.g. PNG).
    title: figure title.
    node_size: marker area of a node, in points^2.
    dpi: resolution of the saved figure.
    figsize: (width, height) in inches; sized from the layout when None.

  Returns:
    The matplotlib `Figure` (not attached to pyplot, so no window opens).

  Raises:
    ValueError: if the graph is empty.
  """
  if graph.num_nodes == 0:
    raise ValueError("cannot draw an empty graph (0 nodes).")
  graph.validate()
  pos = layered_layout(graph)
  xs = np.array([p[0] for p in pos.values()])
  ys = np.array([p[1] for p in pos.values()])
  if figsize is None:
    width = np.clip(
      (xs.max() - xs.min() + 2) * _INCHES_PER_LAYER, _MIN_WIDTH, _MAX_WIDTH
    )
    height = np.clip(
      (ys.max() - ys.min() + 2) * _INCHES_PER_ROW, _MIN_HEIGHT, _MAX_HEIGHT
    )
    figsize = (float(width), float(height) + 1.0)
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()

  nx_graph = nx.DiGraph()
  nx_graph.add_nodes_from(range(graph.num_nodes))
  nx_graph.add_edges_from(
    zip(graph.senders.tolist(), graph.receivers.tolist(), strict=True)
  )
  # Edges that skip layers (residual connections) are drawn as arcs so they
  # do not hide behind the nodes they jump over.
  span = (
    np.abs(xs[graph.receivers] - xs[graph.senders]) if graph.num_edges else []
  )
  for long_edges, style in ((False, "arc3"), (True, f"arc3,rad={_ARC_RAD}")):
    edgelist = [
      (int(s), int(r))
      for s, r, d in zip(graph.senders, graph.receivers, span, strict=True)
      if (d > _LAYER_GAP) == long_edges
    ]
    nx.draw_networkx_edges(
      nx_graph,
      pos,
      edgelist=edgelist,
      ax=ax,
      node_size=node_size,
      width=0.6,
      arrowsize=6,
      edge_color="#555555",
      arrowstyle="-|>",
      connectionstyle=style,
    )
  present = _draw_nodes(nx_graph, graph, pos, ax, node_size)
  ax.legend(
    handles=[_legend_handle(name) for name in present],
    loc="upper center",
    bbox_to_anchor=(0.5, -0.02),
    ncol=min(len(present), 8),
    frameon=False,
    fontsize=9,
  )
  if title:
    ax.set_title(title)
  ax.set_axis_off()
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=dpi)
  return fig


def _draw_nodes(nx_graph, graph, pos, ax, node_size) -> list[str]:
  """Draw nodes grouped by primitive; return the primitives present."""
  present = []
  for index, name in enumerate(graph_lib.PRIMITIVES):
    nodes = np.flatnonzero(graph.node_ops == index).tolist()
    if not nodes:
      continue
    present.append(name)
    size = node_size * (2.0 if name in ("input", "glob_avg", "msa") else 1.0)
    nx.draw_networkx_nodes(
      nx_graph,
      pos,
      nodelist=nodes,
      node_color=PRIMITIVE_COLORS[name],
      node_shape=PRIMITIVE_MARKERS[name],
      node_size=size,
      edgecolors="black",
      linewidths=0.5,
      ax=ax,
    )
  return present


def _legend_handle(name: str) -> Line2D:
  return Line2D(
    [],
    [],
    linestyle="",
    marker=PRIMITIVE_MARKERS[name],
    markersize=math.sqrt(80.0),
    markerfacecolor=PRIMITIVE_COLORS[name],
    markeredgecolor="black",
    label=name,
  )


def primitive_counts(graph: graph_lib.Graph) -> Mapping[str, int]:
  """Return the number of nodes of each primitive present in the graph."""
  counts = np.bincount(graph.node_ops, minlength=len(graph_lib.PRIMITIVES))
  return {
    name: int(c)
    for name, c in zip(graph_lib.PRIMITIVES, counts, strict=True)
    if c
  }


def main(argv: list[str]) -> int:
  """Draw a zoo model's graph: `python -m ghn_jax.plot_graph --model=...`.

  Returns:
    The exit status: 0 on success, 1 for an unknown model name.
  """
  del argv
  import sys

  from absl import flags

  from ghn_jax import graph_builder, zoo

  try:
    model, shape = zoo.create_model(flags.FLAGS.model)
  except ValueError as e:
    # The message names the valid models; a traceback would only hide it.
    print(f"error: {e}", file=sys.stderr)
    return 1
  graph = graph_builder.build_graph(model, input_shape=shape)
  plot_graph(graph, flags.FLAGS.output, title=flags.FLAGS.title or None)
  return 0


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("model", "resnet50", "Zoo model name (ghn_jax.zoo.ZOO).")
  flags.DEFINE_string("output", "graph.png", "Output image file (e.g. PNG).")
  flags.DEFINE_string("title", "", "Figure title.")
  app.run(main)
