"""Build the computational `Graph` of any Flax linen model by tracing it.

`build_graph` traces `model.apply` with `jax.make_jaxpr` (parameters as
abstract inputs, so no FLOPs are spent) and walks the equations, following
the rules of the original GHN-2 graph builder (ppuda's
`deepnets1m/graph.py`), which reads PyTorch's autograd graph instead:

- `conv_general_dilated` with a parameter kernel -> `conv`, or `sep_conv`
  when grouped (`feature_group_count > 1`), or `dil_conv` when grouped and
  dilated. As in the original, a dilated conv without groups is `conv`.
- `dot_general` with a parameter operand (dense layers) -> `conv` with a 2-D
  shape (out, in).
- an added parameter -> `bias`; the bias of a norm layer has no node of its
  own and is predicted from the norm's scale node (`node_extra_params`); an
  added parameter with two or more non-unit axes is a positional encoding:
  a `pos_enc` node (no inputs) and a `sum` node.
- a multiplied parameter -> `bn` or `ln` by the module that owns it
  (`nn.BatchNorm`, `nn.LayerNorm`, `nn.RMSNorm`, or a module class attribute
  `ghn_primitive`); a per-channel multiplier of any other module (ConvNeXt's
  layer scale) -> `ln`, as the original's notes suggest for layer scale.
- the sum of two activations coming from different nodes -> `sum`; a
  concatenation of activations from different nodes -> `concat`.
- `reduce_window_max` / `reduce_window_sum` -> `max_pool` / `avg_pool` with
  shape (1, 1, kh, kw); a sum over the spatial (or token) axes, keeping the
  batch and channel axes -> `glob_avg`.
- a product of two activations (attention scores, attention-weighted
  values) -> one `msa` node per attention; inside a module that declares
  `ghn_primitive = "cse"`, the gating product -> `cse` and its global
  pooling is not a node (the original keeps only the SE block's product).
- every other op (activations, reshapes, dropout, strides) is not a node:
  its inputs connect straight to its consumers.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghn_jax import graph as graph_lib

PRIMITIVE_INDEX = graph_lib.PRIMITIVE_INDEX
CONV_PRIMITIVES = ("conv", "sep_conv", "dil_conv")
NORM_PRIMITIVES = ("bn", "ln")
# Prefix of the named scope pushed around every module method call, so that
# each traced equation can be mapped back to the modules it ran in.
_SCOPE_PREFIX = "ghnscope"
# Shape rank of a node: 4 entries in GHN layout (out, in, h, w).
_SHAPE_SLOTS = 4

# Primitives that only move or re-type a parameter; the result is still
# that parameter (possibly in another layout).
_LAYOUT_PRIMITIVES = frozenset(
  {
    "reshape",
    "broadcast_in_dim",
    "convert_element_type",
    "transpose",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reduce_precision",
  }
)
# Loops and branches: their bodies are not walked, and parameters used in
# them are not predicted.
_OPAQUE_PRIMITIVES = frozenset({"scan", "while", "cond"})


def _flax_classes(*names: str) -> tuple[type, ...]:
  """Return the `flax.linen` classes among `names` that this Flax has."""
  return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


_BN_CLASSES = _flax_classes("BatchNorm")
_LN_CLASSES = _flax_classes("LayerNorm", "RMSNorm")
# Layers whose parameters GHN-2 has no node type for.
_UNSUPPORTED_CLASSES = _flax_classes(
  "Embed",
  "GroupNorm",
  "InstanceNorm",
  "ConvTranspose",
  "ConvLocal",
  "RNNCellBase",
  "SpectralNorm",
  "WeightNorm",
)


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


@dataclasses.dataclass
class _Node:
  """A node while the graph is being built."""

  op: str
  shape: tuple[int, ...] = ()
  perm: tuple[int, ...] = ()
  param: str = ""
  extra: str = ""
  name: str = ""


@dataclasses.dataclass(frozen=True)
class _ModuleInfo:
  """The module behind one intercepted method call.

  `window` is the pooling window of a declared pooling module (its `window`
  attribute), or None.
  """

  path: str
  cls: type
  primitive: str | None
  window: int | None = None

  @property
  def is_unit(self) -> bool:
    """Whether the module's call becomes nodes as a whole (see below)."""
    if self.primitive in _POOL_PRIMITIVES:
      return self.window is not None
    return self.primitive in _UNIT_PRIMITIVES


# Modules declaring one of these `ghn_primitive`s become nodes as a whole:
# their parameters by name (`bias` -> bias node or norm extra, any other ->
# the declared node type) and their inputs and output at the call boundary,
# whatever ops they compute with inside (e.g. a depthwise conv written as
# shifted multiply-adds). Declared modules without parameters of their own
# (attention, squeeze-excitation blocks) only scope the rules above.
_UNIT_PRIMITIVES = frozenset(
  {"conv", "sep_conv", "dil_conv", "bn", "ln", "pos_enc", "bias"}
)
_POOL_PRIMITIVES = frozenset({"max_pool", "avg_pool"})
_BIAS_NAMES = ("bias",)


def _boundary_abstract_eval(out, *inputs, token):
  del inputs, token
  return out


# Identity on its first operand, placed after the call of a unit module so
# that the traced program shows the call's inputs and output in one place.
_boundary_p = jax.extend.core.Primitive("ghn_module_boundary")
_boundary_p.def_impl(lambda out, *inputs, token: out)
_boundary_p.def_abstract_eval(_boundary_abstract_eval)


@dataclasses.dataclass(frozen=True)
class _ParamRef:
  """A traced value that is (a re-layout of) one parameter.

  `layout[i]` is the parameter axis behind axis i of the value, or None
  after a reshape (then the value's own layout is used and the prediction
  is reshaped to the parameter's shape).
  """

  path: str
  layout: tuple[int, ...] | None


class _Tracer:
  """Walk a jaxpr and collect graph nodes and edges."""

  def __init__(
    self,
    param_paths: Mapping[Any, str],
    param_shapes: Mapping[str, tuple[int, ...]],
    modules: Mapping[str, _ModuleInfo],
  ):
    self.nodes: list[_Node] = []
    self.edges: set[tuple[int, int]] = set()
    self.param_shapes = param_shapes
    self.modules = modules
    self.owner = {path: _owner_path(path) for path in param_shapes}
    self.module_by_path = {info.path: info for info in modules.values()}
    # Traced value -> set of nodes it was computed from (activations).
    self.frontier: dict[Any, frozenset[int]] = {}
    # Traced value -> parameter it is a re-layout of.
    self.params: dict[Any, _ParamRef] = {}
    for var, path in param_paths.items():
      ndim = len(param_shapes[path])
      self.params[var] = _ParamRef(path, tuple(range(ndim)))
    self.param_node: dict[str, int] = {}
    self.unsupported: dict[str, str] = {}
    self.tied: dict[str, str] = {}
    # Norm module path -> its scale node, and that node's scope token.
    self.norm_node: dict[str, int] = {}
    self.norm_scope: dict[int, str] = {}
    self.msa_nodes: set[int] = set()

  # Nodes and edges.

  def add_node(self, node: _Node, inputs: frozenset[int]) -> int:
    index = len(self.nodes)
    self.nodes.append(node)
    for source in inputs:
      self.edges.add((source, index))
    return index

  # Module context of an equation.

  def _infos(self, scopes: tuple[str, ...]) -> list[_ModuleInfo]:
    return [self.modules[s] for s in scopes if s in self.modules]

  def _in_primitive_scope(self, scopes: tuple[str, ...], primitive: str):
    return any(info.primitive == primitive for info in self._infos(scopes))

  def _module_kind(self, path: str) -> str | None:
    """Return the GHN-2 primitive that the module at `path` declares."""
    info = self.module_by_path.get(path)
    if info is None:
      return None
    if info.primitive is not None:
      return info.primitive
    if issubclass(info.cls, _BN_CLASSES):
      return "bn"
    if issubclass(info.cls, _LN_CLASSES):
      return "ln"
    return None

  def _unsupported_class(self, path: str) -> type | None:
    """Return the module class of `path` (or an ancestor) if unsupported."""
    owner = self.owner[path]
    parts = owner.split("/") if owner else []
    for end in range(len(parts), 0, -1):
      info = self.module_by_path.get("/".join(parts[:end]))
      if info is not None and issubclass(info.cls, _UNSUPPORTED_CLASSES):
        return info.cls
    return None

  def mark_unsupported(self, path: str, reason: str) -> None:
    cls = self._unsupported_class(path)
    if cls is not None:
      reason = f"{cls.__name__} is not a layer type of GHN-2"
    self.unsupported.setdefault(path, reason)

  # Equation walking.

  def walk(self, jaxpr, scopes: tuple[str, ...] = ()) -> None:
    """Process the equations of `jaxpr` in program order."""
    for eqn in jaxpr.eqns:
      inner = _scope_tokens(str(eqn.source_info.name_stack))
      self.process(eqn, scopes + inner)

  def _value_kind(self, var):
    """Return ('act', frontier), ('param', ref) or ('const', None)."""
    if isinstance(var, jax.extend.core.Literal):
      return "const", None
    if var in self.frontier:
      return "act", self.frontier[var]
    if var in self.params:
      return "param", self.params[var]
    return "const", None

  def process(self, eqn, scopes: tuple[str, ...]) -> None:
    """Process one equation: create nodes or forward its inputs."""
    name = eqn.primitive.name
    kinds = [self._value_kind(v) for v in eqn.invars]
    acts = [value for kind, value in kinds if kind == "act"]
    refs = [value for kind, value in kinds if kind == "param"]

    if name == _boundary_p.name:
      _handle_unit(self, eqn, kinds, self.modules[eqn.params["token"]])
      return
    if any(self.modules[t].is_unit for t in scopes if t in self.modules):
      # Inside a unit module: nodes come from its boundary equation.
      if acts:
        self._forward(eqn, _union(acts), scopes)
      elif refs:
        self._forward_param(eqn, refs)
      return

    sub = _sub_jaxpr(eqn)
    if sub is not None and name not in _OPAQUE_PRIMITIVES:
      self._walk_call(eqn, sub, kinds, scopes)
      return

    if not acts:
      if refs:
        self._forward_param(eqn, refs)
      return

    if name in _OPAQUE_PRIMITIVES:
      for ref in refs:
        self.mark_unsupported(ref.path, f"used inside a `{name}` (loop/branch)")
      self._forward(eqn, _union(acts), scopes)
      return

    handler = _HANDLERS.get(name)
    if handler is not None and handler(self, eqn, kinds, scopes):
      return
    for ref in refs:
      if ref.path in self.param_node or ref.path in self.tied:
        continue
      self.mark_unsupported(
        ref.path, f"used by `{name}`, which has no GHN-2 node type"
      )
    self._forward(eqn, _union(acts), scopes)

  def _walk_call(self, eqn, sub, kinds, scopes) -> None:
    """Walk a called sub-program (jit, custom_jvp, checkpoint) inline."""
    jaxpr = sub.jaxpr if hasattr(sub, "jaxpr") else sub
    consts = getattr(sub, "consts", ())
    del consts  # Constants of a closed jaxpr carry no parameters.
    if len(jaxpr.invars) != len(eqn.invars):
      self._forward(eqn, _union([v for k, v in kinds if k == "act"]), scopes)
      return
    for inner, (kind, value) in zip(jaxpr.invars, kinds, strict=True):
      if kind == "act":
        self.frontier[inner] = value
      elif kind == "param":
        self.params[inner] = value
    self.walk(jaxpr, scopes)
    for outer, inner in zip(eqn.outvars, jaxpr.outvars, strict=True):
      kind, value = self._value_kind(inner)
      if kind == "act":
        self.frontier[outer] = value
      elif kind == "param":
        self.params[outer] = value

  def _forward(self, eqn, frontier: frozenset[int], scopes) -> None:
    """Give all outputs the union of the inputs' nodes (no new node)."""
    frontier = self._absorb_into_norm(frontier, scopes)
    for out in eqn.outvars:
      self.frontier[out] = frontier

  def _absorb_into_norm(self, frontier: frozenset[int], scopes):
    """Reduce a frontier to the norm node inside that norm's module.

    Flax's norms multiply the scale into the statistics before these touch
    the input, so the input and the scale node meet only later. The
    module's output must still come from the norm node alone.
    """
    for node in frontier:
      scope = self.norm_scope.get(node)
      if scope is not None and scope in scopes:
        return frozenset([node])
    return frontier

  def set_output(self, eqn, node: int) -> None:
    for out in eqn.outvars:
      self.frontier[out] = frozenset([node])

  def _forward_param(self, eqn, refs: Sequence[_ParamRef]) -> None:
    """Propagate a parameter through parameter-only computations."""
    ref = refs[0]
    for other in refs[1:]:
      if other.path != ref.path:
        self.mark_unsupported(
          other.path, f"combined with parameter {ref.path} before use"
        )
    layout = None
    name = eqn.primitive.name
    if name in _LAYOUT_PRIMITIVES or len(eqn.invars) > 1:
      layout = ref.layout
      if name == "transpose" and layout is not None:
        layout = tuple(layout[i] for i in eqn.params["permutation"])
      elif name in ("reshape", "broadcast_in_dim", "squeeze", "expand_dims"):
        in_shape = tuple(eqn.invars[0].aval.shape)
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if _squeezed(in_shape) != _squeezed(out_shape):
          layout = None
        elif layout is not None and in_shape != out_shape:
          layout = _relayout_unit_axes(layout, in_shape, out_shape)
    for out in eqn.outvars:
      self.params[out] = _ParamRef(ref.path, layout)

  # Parameter nodes.

  def claim_param(self, ref: _ParamRef, use: str) -> bool:
    """Return True if a node may be created for this use of `ref`."""
    if ref.path in self.unsupported:
      return False
    cls = self._unsupported_class(ref.path)
    if cls is not None:
      self.mark_unsupported(
        ref.path, f"{cls.__name__} is not a layer type of GHN-2"
      )
      return False
    if ref.path in self.param_node or any(
      node.extra == ref.path for node in self.nodes
    ):
      self.tied[ref.path] = (
        f"used again by `{use}` (tied or shared weights); only its first "
        "use is a node"
      )
      return False
    return True

  def param_node_shape(
    self, ref: _ParamRef, var_shape: tuple[int, ...], ghn_axes: Sequence[int]
  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the GHN shape and the GHN -> parameter axes permutation.

    `ghn_axes[g]` is the axis of the traced value that is GHN axis g.
    """
    shape = tuple(int(var_shape[a]) for a in ghn_axes)
    perm_to_var = [0] * len(ghn_axes)
    for g, axis in enumerate(ghn_axes):
      perm_to_var[axis] = g
    layout = ref.layout
    if layout is None or len(layout) != len(var_shape):
      return shape, tuple(perm_to_var)
    perm = [0] * len(layout)
    for var_axis, param_axis in enumerate(layout):
      perm[param_axis] = perm_to_var[var_axis]
    return shape, tuple(perm)


# Equation handlers: each returns True when it consumed the equation.


def _handle_unit(tracer: _Tracer, eqn, kinds, info: _ModuleInfo) -> None:
  """Create the nodes of a unit module from its parameters' names."""
  inputs = _union([v for k, v in kinds[1:] if k == "act"])
  out = eqn.outvars[0]

  if info.primitive in _POOL_PRIMITIVES:
    shape = (1, 1, info.window, info.window)
    node = tracer.add_node(_Node(info.primitive, shape, name=info.path), inputs)
    tracer.frontier[out] = frozenset([node])
    return

  own = [p for p in tracer.param_shapes if tracer.owner[p] == info.path]
  biases = [p for p in own if p.rsplit("/", 1)[-1] in _BIAS_NAMES]
  mains = [p for p in own if p not in biases]
  for extra in mains[1:] + biases[1:]:
    tracer.mark_unsupported(
      extra, f"a second weight of a `{info.primitive}` module"
    )

  frontier = inputs
  main_node = None
  if mains and tracer.claim_param(_ParamRef(mains[0], None), info.primitive):
    main_node = _unit_main_node(tracer, mains[0], info.primitive, inputs)
    frontier = frozenset([main_node])

  if biases and main_node is not None and info.primitive in NORM_PRIMITIVES:
    tracer.nodes[main_node].extra = biases[0]
  elif biases and tracer.claim_param(_ParamRef(biases[0], None), "bias"):
    node = tracer.add_node(
      _Node(
        "bias",
        (math.prod(tracer.param_shapes[biases[0]]),),
        (0,),
        param=biases[0],
        name=biases[0],
      ),
      frontier,
    )
    tracer.param_node[biases[0]] = node
    frontier = frozenset([node])
  tracer.frontier[out] = frontier


def _unit_main_node(tracer: _Tracer, path: str, op: str, inputs) -> int:
  """Create the node of a unit module's main parameter; return its index."""
  shape = tracer.param_shapes[path]
  ndim = len(shape)
  if op == "pos_enc":
    return _add_pos_enc(tracer, path, inputs)

  if ndim == 4:
    ghn_axes = (3, 2, 0, 1)  # HWIO -> (out, in, h, w).
  elif ndim == 2:
    ghn_axes = (1, 0)  # (in, out) -> (out, in).
  else:
    ghn_axes = tuple(range(ndim))
  if op in NORM_PRIMITIVES or op == "bias":
    ghn_axes = tuple(range(ndim))

  node = tracer.add_node(
    _Node(
      op,
      tuple(int(shape[a]) for a in ghn_axes),
      _inverse(ghn_axes),
      param=path,
      name=path,
    ),
    inputs,
  )
  tracer.param_node[path] = node
  return node


def _inverse(axes: Sequence[int]) -> tuple[int, ...]:
  """Return the permutation that undoes `axes`."""
  inverse = [0] * len(axes)
  for i, axis in enumerate(axes):
    inverse[axis] = i
  return tuple(inverse)


def _handle_conv(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  """Make a conv node of a convolution by a parameter kernel."""
  (lhs_kind, lhs), (rhs_kind, rhs) = kinds[:2]
  if lhs_kind != "act" or rhs_kind != "param":
    return False

  params = eqn.params
  rank = len(eqn.invars[0].aval.shape)
  if rank != 4:
    tracer.mark_unsupported(
      rhs.path, f"{rank - 2}-D convolution (only 2-D convolutions are nodes)"
    )
    return False
  if any(d != 1 for d in params["lhs_dilation"]):
    tracer.mark_unsupported(rhs.path, "transposed (input-dilated) convolution")
    return False
  if not tracer.claim_param(rhs, "conv_general_dilated"):
    return False

  groups = params["feature_group_count"]
  dilated = any(d > 1 for d in params["rhs_dilation"])
  op = "conv"
  if groups > 1:
    op = "dil_conv" if dilated else "sep_conv"
  declared = tracer._module_kind(tracer.owner[rhs.path])
  if declared in CONV_PRIMITIVES:
    op = declared

  rhs_spec = params["dimension_numbers"].rhs_spec
  shape, perm = tracer.param_node_shape(
    rhs, tuple(eqn.invars[1].aval.shape), rhs_spec
  )
  node = tracer.add_node(
    _Node(op, shape, perm, param=rhs.path, name=rhs.path), lhs
  )
  tracer.param_node[rhs.path] = node
  tracer.set_output(eqn, node)
  return True


def _handle_dot(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  """Make a conv node of a dense layer, or an msa node of attention."""
  (kind_a, a), (kind_b, b) = kinds[:2]
  if kind_a == "act" and kind_b == "act":
    return _handle_attention(tracer, eqn, a | b, scopes)
  if {kind_a, kind_b} != {"act", "param"}:
    return False

  position = 0 if kind_a == "param" else 1
  ref = a if position == 0 else b
  acts = b if position == 0 else a
  (contract_a, contract_b), (batch_a, batch_b) = eqn.params["dimension_numbers"]
  contract = tuple(contract_a if position == 0 else contract_b)
  batch = tuple(batch_a if position == 0 else batch_b)
  var_shape = tuple(eqn.invars[position].aval.shape)
  free = tuple(i for i in range(len(var_shape)) if i not in contract + batch)

  if batch or not contract or not free:
    tracer.mark_unsupported(ref.path, "batched or degenerate dot_general")
    return False
  contiguous_in_first = contract == tuple(range(len(contract)))
  contiguous_out_first = free == tuple(range(len(free)))
  if not (contiguous_in_first or contiguous_out_first):
    tracer.mark_unsupported(
      ref.path, "dense kernel with interleaved input/output axes"
    )
    return False
  if not tracer.claim_param(ref, "dot_general"):
    return False

  shape = (math.prod(var_shape[i] for i in free),) + (
    math.prod(var_shape[i] for i in contract),
  )
  # A (out, in) prediction becomes the kernel by a transpose (when the
  # kernel's input axes come first) and a reshape to the kernel's shape.
  if len(var_shape) == 2 and ref.layout is not None:
    ghn_axes = (free[0], contract[0])
    shape, perm = tracer.param_node_shape(ref, var_shape, ghn_axes)
  else:
    perm = (1, 0) if contiguous_in_first else (0, 1)

  node = tracer.add_node(
    _Node("conv", shape, perm, param=ref.path, name=ref.path), acts
  )
  tracer.param_node[ref.path] = node
  tracer.set_output(eqn, node)
  return True


def _handle_attention(tracer: _Tracer, eqn, inputs, scopes) -> bool:
  """Make (or extend) the msa node of a product of two activations."""
  merged = [m for m in inputs if m in tracer.msa_nodes]
  if merged:
    msa = max(merged)
    # Attention-weighted values: fold the values' nodes into the msa node
    # created for the scores, unless that would close a cycle.
    if all(n <= msa for n in inputs):
      for source in inputs:
        if source != msa:
          tracer.edges.add((source, msa))
      tracer.set_output(eqn, msa)
      return True
  msa = tracer.add_node(_Node("msa", name="attention"), inputs)
  tracer.msa_nodes.add(msa)
  tracer.set_output(eqn, msa)
  return True


def _handle_add(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  """Make a sum, bias or positional-encoding node, or a norm's extra."""
  acts = [v for k, v in kinds if k == "act"]
  refs = [v for k, v in kinds if k == "param"]
  if len(acts) == 2:
    inputs = _union(acts)
    inputs = tracer._absorb_into_norm(inputs, scopes)
    if len(inputs) > 1:
      tracer.set_output(eqn, tracer.add_node(_Node("sum", name="sum"), inputs))
    else:
      tracer._forward(eqn, inputs, scopes)
    return True
  if len(acts) != 1 or len(refs) != 1:
    return False

  ref, inputs = refs[0], acts[0]
  owner = tracer.owner[ref.path]
  norm = tracer.norm_node.get(owner)
  if norm is not None:
    if tracer.nodes[norm].extra:
      tracer.tied[ref.path] = "a second bias of one norm layer"
      return False
    tracer.nodes[norm].extra = ref.path
    tracer._forward(eqn, inputs, scopes)
    return True

  if not tracer.claim_param(ref, "add"):
    return False
  shape = tracer.param_shapes[ref.path]
  owner_has_weight = any(
    tracer.owner.get(p) == owner for p in tracer.param_node
  )
  declared = tracer._module_kind(owner)
  non_unit = sum(1 for s in shape if s != 1)
  if declared == "pos_enc" or (non_unit >= 2 and not owner_has_weight):
    tracer.set_output(eqn, _add_pos_enc(tracer, ref.path, inputs))
    return True

  size = math.prod(shape)
  node = tracer.add_node(
    _Node("bias", (size,), (0,), param=ref.path, name=ref.path), inputs
  )
  tracer.param_node[ref.path] = node
  tracer.set_output(eqn, node)
  return True


def _add_pos_enc(tracer: _Tracer, path: str, inputs) -> int:
  """Add a `pos_enc` node and its `sum` with `inputs`; return the sum."""
  shape = tracer.param_shapes[path]
  ndim = len(shape)
  if ndim >= 2:
    # Channels last in Flax, second in GHN layout (1, C, H, W).
    ghn_axes = (0, ndim - 1) + tuple(range(1, ndim - 1))
  else:
    ghn_axes = (0,)
  ghn_shape = tuple(int(shape[a]) for a in ghn_axes)
  node = _Node("pos_enc", ghn_shape, _inverse(ghn_axes), param=path, name=path)
  pos = tracer.add_node(node, frozenset())
  tracer.param_node[path] = pos
  return tracer.add_node(_Node("sum", name="sum"), inputs | {pos})


def _handle_mul(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  """Make a norm, layer-scale or cse node of a product."""
  acts = [v for k, v in kinds if k == "act"]
  refs = [v for k, v in kinds if k == "param"]
  if len(acts) == 2:
    inputs = tracer._absorb_into_norm(_union(acts), scopes)
    if len(inputs) > 1 and tracer._in_primitive_scope(scopes, "cse"):
      tracer.set_output(eqn, tracer.add_node(_Node("cse", name="cse"), inputs))
    else:
      tracer._forward(eqn, inputs, scopes)
    return True
  if len(acts) != 1 or len(refs) != 1:
    return False

  ref, inputs = refs[0], acts[0]
  if not tracer.claim_param(ref, "mul"):
    return False
  owner = tracer.owner[ref.path]
  op = tracer._module_kind(owner)
  size = math.prod(tracer.param_shapes[ref.path])
  if op in NORM_PRIMITIVES:
    node = tracer.add_node(
      _Node(op, (size,), (0,), param=ref.path, name=ref.path), inputs
    )
    tracer.norm_node[owner] = node
    if scopes:
      tracer.norm_scope[node] = scopes[-1]
  else:
    # A learned per-channel multiplier of another module (layer scale).
    node = tracer.add_node(
      _Node("ln", (size,), (0,), param=ref.path, name=ref.path), inputs
    )
  tracer.param_node[ref.path] = node
  tracer.set_output(eqn, node)
  return True


def _handle_concat(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  acts = [v for k, v in kinds if k == "act"]
  for kind, ref in kinds:
    if kind == "param":
      tracer.mark_unsupported(
        ref.path, "concatenated to activations (e.g. a class token)"
      )
  inputs = _union(acts)
  if len(inputs) > 1:
    node = tracer.add_node(_Node("concat", name="concat"), inputs)
    tracer.set_output(eqn, node)
  else:
    tracer._forward(eqn, inputs, scopes)
  return True


def _handle_pool(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  if kinds[0][0] != "act":
    return False
  window = tuple(eqn.params["window_dimensions"])
  spatial = tuple(w for w in window[1:-1]) if len(window) > 2 else window
  if all(w == 1 for w in spatial):
    tracer._forward(eqn, kinds[0][1], scopes)
    return True
  op = "max_pool" if eqn.primitive.name == "reduce_window_max" else "avg_pool"
  shape = (1, 1) + tuple(int(w) for w in spatial)
  node = tracer.add_node(_Node(op, shape, name=op), kinds[0][1])
  tracer.set_output(eqn, node)
  return True


def _handle_reduce_sum(tracer: _Tracer, eqn, kinds, scopes) -> bool:
  if kinds[0][0] != "act":
    return False
  ndim = len(eqn.invars[0].aval.shape)
  axes = tuple(eqn.params["axes"])
  pooled = ndim >= 3 and axes and all(0 < a < ndim - 1 for a in axes)
  if not pooled or tracer._in_primitive_scope(scopes, "cse"):
    return False
  inputs = kinds[0][1]
  if _in_norm_scope(tracer, inputs, scopes):
    return False
  node = tracer.add_node(_Node("glob_avg", name="glob_avg"), inputs)
  tracer.set_output(eqn, node)
  return True


def _in_norm_scope(tracer: _Tracer, inputs, scopes) -> bool:
  """Return True if the equation runs inside a norm or cse module."""
  for info in tracer._infos(scopes):
    kind = info.primitive
    if kind is None:
      if issubclass(info.cls, _BN_CLASSES + _LN_CLASSES):
        return True
    elif kind in NORM_PRIMITIVES:
      return True
  return False


_HANDLERS: dict[str, Callable[..., bool]] = {
  "conv_general_dilated": _handle_conv,
  "dot_general": _handle_dot,
  "add": _handle_add,
  "add_any": _handle_add,
  "mul": _handle_mul,
  "concatenate": _handle_concat,
  "reduce_window_max": _handle_pool,
  "reduce_window_sum": _handle_pool,
  "reduce_sum": _handle_reduce_sum,
}


# Helpers.


def _union(sets: Sequence[frozenset[int]]) -> frozenset[int]:
  return frozenset().union(*sets) if sets else frozenset()


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(s for s in shape if s != 1)


def _relayout_unit_axes(
  layout: tuple[int, ...], in_shape, out_shape
) -> tuple[int, ...] | None:
  """Map `layout` through a reshape that only adds or drops unit axes."""
  in_axes = [layout[i] for i, s in enumerate(in_shape) if s != 1]
  if len(out_shape) != len(in_axes):
    return None
  return tuple(in_axes) if all(s != 1 for s in out_shape) else None


def _owner_path(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def _scope_tokens(name_stack: str) -> tuple[str, ...]:
  return tuple(p for p in name_stack.split("/") if p.startswith(_SCOPE_PREFIX))


def _sub_jaxpr(eqn):
  """Return the called program of a call-like equation, or None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
      return sub
  return None


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
  modules: dict[str, _ModuleInfo] = {}
  counter = itertools.count()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    token = f"{_SCOPE_PREFIX}{next(counter)}"
    path = "/".join(str(p) for p in module.path) if module.path else ""
    window = getattr(module, "window", None)
    info = _ModuleInfo(
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
        out = _boundary_p.bind(out, *arrays, token=token)
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
  graph, report = _finish(tracer, output_nodes, param_sizes, strict)
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
  tracer = _Tracer(param_paths, param_shapes, modules)
  input_node = tracer.add_node(_Node("input", name="input"), frozenset())
  tracer.frontier[jaxpr.invars[num_vars]] = frozenset([input_node])
  tracer.walk(jaxpr)
  kind, frontier = tracer._value_kind(jaxpr.outvars[0])
  if kind != "act" or not frontier - {input_node}:
    raise ValueError(
      "the model's output does not depend on any parameter node; nothing "
      "for a GHN to predict."
    )
  return tracer, frontier


def _finish(
  tracer: _Tracer,
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


def _pack(nodes: Sequence[_Node], senders, receivers) -> graph_lib.Graph:
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
