"""Build the computational `Graph` of any Flax linen model by tracing it.

`build_graph` traces `model.apply` with `jax.make_jaxpr` (parameters as
abstract inputs, so no FLOPs are spent) while `flax.linen.intercept_methods`
wraps every module call in a named scope. `graph_tracer.Tracer` then walks
the equations and applies the rules of the original GHN-2 graph builder (see
`graph_tracer` for the list).

Nodes come in a topological order that follows the order of the traced
program, so the classifier's weight and bias are the last two nodes. Only
nodes on a path to the output are kept: a parameter whose module does not
reach the output is left out (`GraphReport.pruned_params`), as the original
removes such modules. Parameters the GHN cannot predict (embeddings, group
norm, recurrent cells, 1-D/3-D or transposed convolutions, parameters used
inside loops, tied parameters) are reported with a warning, or raise
`ValueError` with `strict=True`.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghn_jax import graph as graph_lib
from ghn_jax import graph_tracer
from ghn_jax.graph_tracer import ModuleInfo, Node, Tracer

PRIMITIVE_INDEX = graph_lib.PRIMITIVE_INDEX
# Shape rank of a node: 4 entries in GHN layout (out, in, h, w).
_SHAPE_SLOTS = 4


class UnsupportedLayerWarning(UserWarning):
  """Warning that lists parameters the GHN will not predict."""


@dataclasses.dataclass(frozen=True)
class GraphReport:
  """Outcome of `build_graph` for each parameter of the model.

  Attributes:
    predicted_params: paths of the parameters predicted from some node.
    pruned_params: paths of the parameters left out because their module
      does not reach the output (the original removes these modules).
    unsupported_params: path -> reason, for parameters on the data path
      that the GHN cannot predict.
    num_params: number of parameter values in the model.
    num_predicted: number of parameter values predicted from the graph.
  """

  predicted_params: tuple[str, ...]
  pruned_params: tuple[str, ...]
  unsupported_params: Mapping[str, str]
  num_params: int
  num_predicted: int


def _param_leaves(params) -> dict[str, Any]:
  """Flatten a params pytree into {'a/b/kernel': leaf}."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return dict(flat)


def _topological_order(num_nodes: int, edges, sources_first: int = 0):
  """Kahn's algorithm, ties broken by creation order (deterministic)."""
  successors = [[] for _ in range(num_nodes)]
  indegree = [0] * num_nodes
  for s, r in edges:
    successors[s].append(r)
    indegree[r] += 1
  heap = [i for i in range(num_nodes) if indegree[i] == 0]
  heapq.heapify(heap)
  order = []
  while heap:
    i = heapq.heappop(heap)
    order.append(i)
    for r in successors[i]:
      indegree[r] -= 1
      if indegree[r] == 0:
        heapq.heappush(heap, r)
  if len(order) != num_nodes:
    raise ValueError("the traced graph has a cycle; please report the model.")
  return order


def _ancestors(targets, edges, num_nodes: int) -> set[int]:
  predecessors = [[] for _ in range(num_nodes)]
  for s, r in edges:
    predecessors[r].append(s)
  seen = set(targets)
  stack = list(targets)
  while stack:
    for p in predecessors[stack.pop()]:
      if p not in seen:
        seen.add(p)
        stack.append(p)
  return seen


def _first_leaf(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("the model returned no arrays; cannot find its output.")
  return leaves[0]


def trace_model(
  model: nn.Module,
  variables: Mapping[str, Any],
  inputs: jax.ShapeDtypeStruct | jax.Array,
  apply_kwargs: Mapping[str, Any] | None = None,
):
  """Trace `model.apply` into a jaxpr with module scopes recorded.

  Returns:
    `(closed_jaxpr, modules)`: the program, whose inputs are the flattened
    `variables` followed by `inputs`, and the module behind the scope token
    of each intercepted method call.
  """
  apply_kwargs = dict(apply_kwargs or {})
  modules: dict[str, ModuleInfo] = {}
  counter = itertools.count()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    token = f"{graph_tracer.SCOPE_PREFIX}{next(counter)}"
    path = "/".join(str(p) for p in module.path) if module.path else ""
    window = getattr(module, "window", None)
    info = ModuleInfo(
      path,
      type(module),
      getattr(type(module), "ghn_primitive", None),
      window if isinstance(window, int) else None,
    )
    modules[token] = info
    with jax.named_scope(token):
      out = next_fun(*args, **kwargs)
    if info.is_unit and context.method_name == "__call__":
      arrays = [
        a
        for a in jax.tree_util.tree_leaves((args, kwargs))
        if isinstance(a, jax.Array)
      ]
      if isinstance(out, jax.Array):
        out = graph_tracer.boundary_p.bind(out, *arrays, token=token)
    return out

  # Models that draw random numbers (dropout in training mode) get a key;
  # the values do not matter for the graph.
  apply_kwargs.setdefault("rngs", {"dropout": jax.random.key(0)})

  def apply_fn(variables, x):
    with nn.intercept_methods(interceptor):
      out = model.apply(variables, x, mutable=True, **apply_kwargs)
    return _first_leaf(out[0])

  closed = jax.make_jaxpr(apply_fn)(variables, inputs)
  return closed, modules


def build_graph_with_report(
  model: nn.Module,
  variables: Mapping[str, Any] | None = None,
  *,
  input_shape: Sequence[int] | None = None,
  input_dtype: Any = jnp.float32,
  apply_kwargs: Mapping[str, Any] | None = None,
  strict: bool = False,
  trace: bool = False,
  cache: bool = True,
) -> tuple[graph_lib.Graph, GraphReport]:
  """Build the GHN-2 computational graph of a Flax model.

  A DeepNets-1M `Network` gets its graph from its config
  (`graph_deepnets`, the same graph ~300x faster) unless `trace` is set.

  Args:
    model: a Flax linen module whose `__call__` takes one input array.
    variables: the model's variables ({'params': ..., 'batch_stats': ...});
      arrays or `jax.ShapeDtypeStruct`s. If None, they are created
      abstractly with `model.init` (no memory, no FLOPs).
    input_shape: shape of the input, batch axis included, e.g.
      (1, 32, 32, 3).
    input_dtype: dtype of the input.
    apply_kwargs: extra keyword arguments of `model.apply`, e.g.
      {'train': False}.
    strict: raise instead of warning when a parameter cannot be predicted.
    trace: always trace, even a DeepNets-1M `Network`.
    cache: reuse the graph traced earlier for an equal model (Flax modules
      compare by their fields) with the same variable shapes, input and
      apply arguments. Tracing a ResNet-50 takes ~0.5 s; a cached graph
      comes back in microseconds. Warnings are raised again on reuse.

  Returns:
    `(graph, report)`.

  Raises:
    ValueError: if `input_shape` is missing, the model has no parameter on
      the path to its output, or (with `strict=True`) some parameters cannot
      be predicted.
  """
  if input_shape is None:
    raise ValueError(
      "input_shape is required, e.g. (1, 32, 32, 3) for CIFAR-10 images."
    )
  if not trace and _is_deepnets_network(model, input_shape):
    from ghn_jax import graph_deepnets  # Imports this module.

    return graph_deepnets.build_deepnets_graph_with_report(model.config)
  key = None
  if cache:
    key = _cache_key(model, variables, input_shape, input_dtype, apply_kwargs)
  if key is not None and key in _cache:
    _cache.move_to_end(key)
    graph, report = _cache[key]
    _warn_unsupported(report, strict)
    return graph, report

  x = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype)
  if variables is None:
    variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, **dict(apply_kwargs or {})),
      x,
    )
  if "params" not in variables:
    raise ValueError(
      "variables has no 'params' collection: the model has no parameters "
      "for a GHN to predict."
    )
  abstract = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), dict(variables)
  )
  closed, modules = trace_model(model, abstract, x, apply_kwargs)
  tracer, output_nodes = _walk_traced(closed, abstract, modules)
  param_sizes = {
    path: math.prod(np.shape(leaf))
    for path, leaf in _param_leaves(abstract["params"]).items()
  }
  graph, report = finish_graph(tracer, output_nodes, param_sizes, strict)
  if key is not None:
    _cache[key] = (graph, report)
    if len(_cache) > _CACHE_SIZE:
      _cache.popitem(last=False)
  return graph, report


# Traced graphs kept in memory, keyed by model, variables' shapes, input and
# apply arguments (`build_graph_with_report(..., cache=True)`).
_CACHE_SIZE = 256
_cache: collections.OrderedDict = collections.OrderedDict()


def _cache_key(model, variables, input_shape, input_dtype, apply_kwargs):
  """Return a hashable key for the graph of these arguments, or None."""
  shapes = None
  if variables is not None:
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    shapes = tuple(
      (jax.tree_util.keystr(path), np.shape(leaf), str(leaf.dtype))
      for path, leaf in leaves
    )
  kwargs = tuple(sorted((apply_kwargs or {}).items()))
  key = (model, shapes, tuple(input_shape), str(np.dtype(input_dtype)), kwargs)
  try:
    hash(key)
  except TypeError:
    return None  # A model field or apply argument is unhashable.
  return key


def clear_cache() -> None:
  """Forget the graphs that `build_graph(..., cache=True)` kept."""
  _cache.clear()


def _is_deepnets_network(model: nn.Module, input_shape) -> bool:
  """Check whether `model` is a DeepNets-1M `Network` fed its own input."""
  from ghn_jax.deepnets1m import net  # Imported on use: a heavy package.

  if type(model) is not net.Network:
    return False
  size = model.config.input_size
  return tuple(input_shape)[1:] == (size, size, 3)


def build_graph(
  model: nn.Module,
  variables: Mapping[str, Any] | None = None,
  *,
  input_shape: Sequence[int] | None = None,
  input_dtype: Any = jnp.float32,
  apply_kwargs: Mapping[str, Any] | None = None,
  strict: bool = False,
  trace: bool = False,
  cache: bool = True,
) -> graph_lib.Graph:
  """Build the GHN-2 graph of a Flax model (see `build_graph_with_report`)."""
  graph, _ = build_graph_with_report(
    model,
    variables,
    input_shape=input_shape,
    input_dtype=input_dtype,
    apply_kwargs=apply_kwargs,
    strict=strict,
    trace=trace,
    cache=cache,
  )
  return graph


def _walk_traced(closed, variables, modules):
  """Walk the traced program from its inputs; return tracer and outputs."""
  jaxpr = closed.jaxpr
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(variables)[0]
  num_vars = len(leaves_with_paths)
  param_paths = {}
  param_shapes = {}
  for var, (key_path, leaf) in zip(
    jaxpr.invars[:num_vars], leaves_with_paths, strict=True
  ):
    keys = [str(getattr(k, "key", k)) for k in key_path]
    if keys[0] != "params":
      continue
    path = "/".join(keys[1:])
    param_paths[var] = path
    param_shapes[path] = tuple(leaf.shape)
  tracer = Tracer(param_paths, param_shapes, modules)
  input_node = tracer.add_node(Node("input", name="input"), frozenset())
  tracer.frontier[jaxpr.invars[num_vars]] = frozenset([input_node])
  tracer.walk(jaxpr)
  kind, frontier = tracer._value_kind(jaxpr.outvars[0])
  if kind != "act" or not frontier - {input_node}:
    raise ValueError(
      "the model's output does not depend on any parameter node; nothing "
      "for a GHN to predict."
    )
  return tracer, frontier


def finish_graph(
  tracer: Tracer,
  output_nodes: frozenset[int],
  param_sizes: Mapping[str, int],
  strict: bool,
) -> tuple[graph_lib.Graph, GraphReport]:
  """Prune, order and pack the nodes; report what each parameter became.

  Args:
    tracer: the nodes and edges collected from the program.
    output_nodes: the nodes the model's output is computed from.
    param_sizes: number of values of each parameter of the model, by path.
    strict: raise instead of warning about unsupported parameters.
  """
  keep = _ancestors(output_nodes, tracer.edges, len(tracer.nodes))
  edges = [(s, r) for s, r in tracer.edges if s in keep and r in keep]
  order = [i for i in _topological_order(len(tracer.nodes), edges) if i in keep]
  new_index = {old: new for new, old in enumerate(order)}
  nodes = [tracer.nodes[i] for i in order]
  senders = np.array([new_index[s] for s, _ in sorted(edges)], np.int32)
  receivers = np.array([new_index[r] for _, r in sorted(edges)], np.int32)
  edge_order = np.lexsort((receivers, senders))
  graph = _pack(nodes, senders[edge_order], receivers[edge_order])

  predicted = [n.param for n in nodes if n.param] + [
    n.extra for n in nodes if n.extra
  ]
  predicted_set = set(predicted)
  unsupported = {
    p: r for p, r in tracer.unsupported.items() if p not in predicted_set
  }
  for path, reason in tracer.tied.items():
    if path in predicted_set:
      unsupported.setdefault(path, reason)
  pruned = tuple(
    sorted(
      p for p in param_sizes if p not in predicted_set and p not in unsupported
    )
  )
  sizes = param_sizes
  report = GraphReport(
    predicted_params=tuple(sorted(predicted_set)),
    pruned_params=pruned,
    unsupported_params=dict(sorted(unsupported.items())),
    num_params=sum(sizes.values()),
    num_predicted=sum(sizes[p] for p in predicted_set),
  )
  _warn_unsupported(report, strict)
  return graph, report


def _warn_unsupported(report: GraphReport, strict: bool) -> None:
  """Warn about (or with `strict`, raise on) unsupported parameters."""
  if not report.unsupported_params:
    return
  lines = "\n".join(f"  {p}: {r}" for p, r in report.unsupported_params.items())
  message = (
    f"The GHN will not predict (or not fully) these parameters:\n{lines}"
  )
  if strict:
    raise ValueError(message + "\nPass strict=False to build anyway.")
  warnings.warn(message, UnsupportedLayerWarning, stacklevel=4)


def _pack(nodes: Sequence[Node], senders, receivers) -> graph_lib.Graph:
  """Turn the node list into a `Graph`."""
  n = len(nodes)
  shapes = np.zeros((n, _SHAPE_SLOTS), np.int64)
  perms = np.tile(np.arange(_SHAPE_SLOTS, dtype=np.int32), (n, 1))
  for i, node in enumerate(nodes):
    shape = node.shape
    if len(shape) > _SHAPE_SLOTS:
      raise ValueError(f"node {node.name} has a shape {shape} of rank > 4.")
    shapes[i, : len(shape)] = shape
    perms[i, : len(node.perm)] = node.perm
  graph = graph_lib.Graph(
    node_ops=np.array([PRIMITIVE_INDEX[n.op] for n in nodes], np.int32),
    node_shapes=shapes,
    node_params=tuple(n.param for n in nodes),
    node_extra_params=tuple(n.extra for n in nodes),
    node_param_perm=perms,
    senders=senders.astype(np.int32),
    receivers=receivers.astype(np.int32),
    node_names=tuple(n.name or n.op for n in nodes),
  )
  graph.validate()
  return graph
