"""Graphs of DeepNets-1M networks, built directly from their `NetConfig`.

Tracing a network with `jax.make_jaxpr` (`graph_builder.build_graph`) takes
0.3-1 s per DeepNets-1M network, far slower than the original's 0.14 s. This
module emits the same nodes and edges without tracing: it walks the network
structure of `deepnets1m.plan.build_plan` in the order in which
`deepnets1m.net.Network` calls its modules, applying the rules of
`graph_tracer`. `tests/test_graph_builder.py` checks that both builders give
identical graphs. Any change to the order of module calls in `net.py` or
`layers.py` must be mirrored here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ghn_jax import graph as graph_lib
from ghn_jax import graph_builder, graph_tracer
from ghn_jax.deepnets1m import plan as plan_lib
from ghn_jax.deepnets1m.config import NetConfig

Frontier = frozenset[int]
_EMPTY: Frontier = frozenset()


class _Emitter:
  """Create the nodes of a DeepNets-1M network in the traced order."""

  def __init__(self, config: NetConfig):
    self.config = config
    self.plan = plan_lib.build_plan(config)
    self.specs = {
      spec.path: spec for spec in plan_lib.param_specs(config) if spec.live
    }
    shapes = {path: spec.shape for path, spec in self.specs.items()}
    self.tracer = graph_tracer.Tracer({}, shapes, {})

  # Nodes.

  def _param(self, path: str, op: str, inputs: Frontier) -> Frontier:
    spec = self.specs[path]
    node = graph_tracer.Node(
      op, spec.torch_shape, spec.perm, param=path, name=path
    )
    index = self.tracer.add_node(node, inputs)
    self.tracer.param_node[path] = index
    return frozenset([index])

  def _op(self, op: str, inputs: Frontier, name: str = "", shape=()):
    node = graph_tracer.Node(op, shape, name=name or op)
    return frozenset([self.tracer.add_node(node, inputs)])

  def _merge(self, op: str, parts: Sequence[Frontier]) -> Frontier:
    """Add a sum or concatenation node if inputs come from 2+ nodes."""
    inputs = frozenset().union(*parts)
    return self._op(op, inputs) if len(inputs) > 1 else inputs

  # Layers of `deepnets1m.layers`.

  def conv(self, path: str, x: Frontier, op: str = "conv") -> Frontier:
    return self._param(f"{path}/kernel", op, x)

  def batch_norm(self, path: str, x: Frontier) -> Frontier:
    if self.config.norm is None:
      return x
    return self.norm(path, x, "bn")

  def norm(self, path: str, x: Frontier, op: str) -> Frontier:
    out = self._param(f"{path}/scale", op, x)
    self.tracer.nodes[min(out)].extra = f"{path}/bias"
    return out

  def dense(self, path: str, x: Frontier, bias: bool = True) -> Frontier:
    x = self._param(f"{path}/kernel", "conv", x)
    if bias:
      x = self._param(f"{path}/bias", "bias", x)
    return x

  def pool(self, op: str, path: str, window: int, x: Frontier) -> Frontier:
    return self._op(op, x, name=path, shape=(1, 1, window, window))

  def relu_conv_bn(self, path: str, x: Frontier, double: bool = False):
    if double:
      x = self.conv(f"{path}/conv_1xk", x)
      x = self.conv(f"{path}/conv_kx1", x)
    else:
      x = self.conv(f"{path}/conv", x)
    return self.batch_norm(f"{path}/bn", x)

  def factorized_reduce(self, path: str, x: Frontier) -> Frontier:
    even = self.conv(f"{path}/conv1", x)
    odd = self.conv(f"{path}/conv2", x)
    return self.batch_norm(f"{path}/bn", self._merge("concat", (even, odd)))

  def sep_conv(self, path: str, x: Frontier) -> Frontier:
    for block in (1, 2):
      x = self.conv(f"{path}/depthwise{block}", x, "sep_conv")
      x = self.conv(f"{path}/pointwise{block}", x)
      x = self.batch_norm(f"{path}/bn{block}", x)
    return x

  def dil_conv(self, path: str, x: Frontier) -> Frontier:
    x = self.conv(f"{path}/depthwise", x, "dil_conv")
    x = self.conv(f"{path}/pointwise", x)
    return self.batch_norm(f"{path}/bn", x)

  def transformer(self, path: str, x: Frontier) -> Frontier:
    tokens = x
    h = self.norm(f"{path}/ln1", tokens, "ln")
    h = self.dense(f"{path}/to_qkv", h, bias=False)
    h = self._op("msa", h, name="attention")
    h = self.dense(f"{path}/to_out", h)
    tokens = self._merge("sum", (h, tokens))
    h = self.norm(f"{path}/ln2", tokens, "ln")
    h = self.dense(f"{path}/ff1", h)
    h = self.dense(f"{path}/ff2", h)
    return self._merge("sum", (h, tokens))

  def channel_se(self, path: str, x: Frontier) -> Frontier:
    gate = self.dense(f"{path}/fc1", x)
    gate = self.dense(f"{path}/fc2", gate)
    inputs = x | gate
    return self._op("cse", inputs) if len(inputs) > 1 else inputs

  # Network structure of `deepnets1m.net`.

  def operation(self, op: str, stride: int, path: str, x: Frontier):
    kind, kernel = plan_lib.parse_op(op)
    if kind in ("max_pool", "avg_pool"):
      return self.pool(kind, path, kernel, x)
    if kind == "skip_connect":
      return x if stride == 1 else self.factorized_reduce(path, x)
    if kind in ("conv", "conv_double"):
      return self.relu_conv_bn(path, x, double=kind == "conv_double")
    if kind == "sep_conv":
      return self.sep_conv(path, x)
    if kind == "dil_conv":
      return self.dil_conv(path, x)
    if kind == "msa":
      return self.transformer(path, x)
    if kind == "cse":
      return self.channel_se(path, x)
    raise ValueError(f"Operation {op!r} has no module.")

  def cell(self, cell: plan_lib.CellPlan, s0, s1) -> Frontier:
    path = f"cells_{cell.index}"
    states: list[Frontier | None] = []
    for which, x in enumerate((s0, s1)):
      if not cell.preprocess_live[which]:
        states.append(None)
      elif not self.config.preprocess:
        states.append(x)
      elif which == 0 and cell.reduction_prev:
        states.append(self.factorized_reduce(f"{path}/preprocess0", x))
      else:
        states.append(self.relu_conv_bn(f"{path}/preprocess{which}", x))

    for step in range(len(cell.edges) // 2):
      total = None
      for edge in (2 * step, 2 * step + 1):
        if not cell.edge_live[edge]:
          continue
        op, source = cell.edges[edge]
        h = self.operation(
          op, cell.strides[edge], f"{path}/ops_{edge}", states[source]
        )
        total = h if total is None else self._merge("sum", (total, h))
      states.append(total)

    # Empty states join the concatenation as constant zeros (no node).
    parts = [
      states[i] if states[i] is not None else _EMPTY for i in cell.concat
    ]
    return self._merge("concat", parts)

  def stem(self) -> tuple[Frontier | None, Frontier | None]:
    config = self.config
    x = frozenset([self.tracer.add_node(graph_tracer.Node("input"), _EMPTY)])
    if config.vit:
      x = self.conv("stem0/conv", x)
      pos = self._param("pos_enc/embedding", "pos_enc", _EMPTY)
      x = self._op("sum", x | pos)
      return x, x
    if config.stem_type == 0:
      x = self.conv("stem/conv", x)
      x = self.batch_norm("stem/bn", x)
      if config.stem_pool:
        x = self.pool("max_pool", "stem/pool", plan_lib.POOL_WINDOW, x)
      return x, x
    s0 = s1 = None
    if self.plan.stem_live[0]:
      s0 = self.conv("stem0/conv1", x)
      s0 = self.batch_norm("stem0/bn1", s0)
      s0 = self.conv("stem0/conv2", s0)
      s0 = self.batch_norm("stem0/bn2", s0)
    if self.plan.stem_live[1]:
      s1 = self.conv("stem1/conv", s0)
      s1 = self.batch_norm("stem1/bn", s1)
    return s0, s1

  def network(self) -> Frontier:
    s0, s1 = self.stem()
    for cell in self.plan.cells:
      if not cell.live:
        s0, s1 = s1, None
        continue
      s0, s1 = s1, self.cell(cell, s0, s1)
    features = s1
    if self.config.global_pooling:
      features = self._op("glob_avg", features)
    num_layers = max(self.config.num_fc_layers, 1)
    for layer in range(num_layers):
      features = self.dense(f"classifier/fc{layer}", features)
    return features


def build_deepnets_graph_with_report(
  config: NetConfig,
) -> tuple[graph_lib.Graph, graph_builder.GraphReport]:
  """Build the graph of the DeepNets-1M network of `config` without tracing.

  Returns:
    `(graph, report)`, identical to what `graph_builder.build_graph_with_report`
    returns for `deepnets1m.net.Network(config)`.
  """
  emitter = _Emitter(config)
  output = emitter.network()
  sizes = {path: spec.size for path, spec in emitter.specs.items()}
  return graph_builder.finish_graph(emitter.tracer, output, sizes, strict=True)


def build_deepnets_graph(config: NetConfig) -> graph_lib.Graph:
  """Build the graph of the DeepNets-1M network of `config` (no tracing)."""
  return build_deepnets_graph_with_report(config)[0]
