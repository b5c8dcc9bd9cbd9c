"""Walk a traced Flax program and collect the GHN-2 graph's nodes and edges.

`graph_builder.build_graph` traces `model.apply` with `jax.make_jaxpr`;
`Tracer` walks the equations in program order. Every traced value carries the
set of nodes it is computed from, and ops that are not nodes pass that set on
(the original's rule of removing a node and joining its inputs to its
outputs). The rules follow the original GHN-2 graph builder (ppuda's
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

Modules that own parameters and declare a `ghn_primitive` (the DeepNets-1M
layers) are taken as a whole at their call boundary, whatever ops they use
inside (see `UNIT_PRIMITIVES`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from ghn_jax import graph as graph_lib

PRIMITIVE_INDEX = graph_lib.PRIMITIVE_INDEX
CONV_PRIMITIVES = ("conv", "sep_conv", "dil_conv")
NORM_PRIMITIVES = ("bn", "ln")
# Prefix of the named scope pushed around every module method call, so that
# each traced equation can be mapped back to the modules it ran in.
SCOPE_PREFIX = "ghnscope"

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


@dataclasses.dataclass
class Node:
  """A node while the graph is being built."""

  op: str
  shape: tuple[int, ...] = ()
  perm: tuple[int, ...] = ()
  param: str = ""
  extra: str = ""
  name: str = ""


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
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
    return self.primitive in UNIT_PRIMITIVES


# Modules declaring one of these `ghn_primitive`s become nodes as a whole:
# their parameters by name (`bias` -> bias node or norm extra, any other ->
# the declared node type) and their inputs and output at the call boundary,
# whatever ops they compute with inside (e.g. a depthwise conv written as
# shifted multiply-adds). Declared modules without parameters of their own
# (attention, squeeze-excitation blocks) only scope the rules above.
UNIT_PRIMITIVES = frozenset(
  {"conv", "sep_conv", "dil_conv", "bn", "ln", "pos_enc", "bias"}
)
_POOL_PRIMITIVES = frozenset({"max_pool", "avg_pool"})
_BIAS_NAMES = ("bias",)


def _boundary_abstract_eval(out, *inputs, token):
  del inputs, token
  return out


# Identity on its first operand, placed after the call of a unit module so
# that the traced program shows the call's inputs and output in one place.
boundary_p = jax.extend.core.Primitive("ghn_module_boundary")
boundary_p.def_impl(lambda out, *inputs, token: out)
boundary_p.def_abstract_eval(_boundary_abstract_eval)


@dataclasses.dataclass(frozen=True)
class ParamRef:
  """A traced value that is (a re-layout of) one parameter.

  `layout[i]` is the parameter axis behind axis i of the value, or None
  after a reshape (then the value's own layout is used and the prediction
  is reshaped to the parameter's shape).
  """

  path: str
  layout: tuple[int, ...] | None


class Tracer:
  """Walk a jaxpr and collect graph nodes and edges."""

  def __init__(
    self,
    param_paths: Mapping[Any, str],
    param_shapes: Mapping[str, tuple[int, ...]],
    modules: Mapping[str, ModuleInfo],
  ):
    self.nodes: list[Node] = []
    self.edges: set[tuple[int, int]] = set()
    self.param_shapes = param_shapes
    self.modules = modules
    self.owner = {path: _owner_path(path) for path in param_shapes}
    self.module_by_path = {info.path: info for info in modules.values()}
    # Traced value -> set of nodes it was computed from (activations).
    self.frontier: dict[Any, frozenset[int]] = {}
    # Traced value -> parameter it is a re-layout of.
    self.params: dict[Any, ParamRef] = {}
    for var, path in param_paths.items():
      ndim = len(param_shapes[path])
      self.params[var] = ParamRef(path, tuple(range(ndim)))
    self.param_node: dict[str, int] = {}
    self.unsupported: dict[str, str] = {}
    self.tied: dict[str, str] = {}
    # Norm module path -> its scale node, and that node's scope token.
    self.norm_node: dict[str, int] = {}
    self.norm_scope: dict[int, str] = {}
    self.msa_nodes: set[int] = set()
    # Caches keyed by object identity, holding the object to keep it alive.
    self._scope_cache: dict[int, tuple[Any, tuple[str, ...]]] = {}
    self._inert_cache: dict[int, tuple[Any, bool]] = {}
    self._unit_scope_cache: dict[tuple[str, ...], bool] = {}

  # Nodes and edges.

  def add_node(self, node: Node, inputs: frozenset[int]) -> int:
    index = len(self.nodes)
    self.nodes.append(node)
    for source in inputs:
      self.edges.add((source, index))
    return index

  # Module context of an equation.

  def _infos(self, scopes: tuple[str, ...]) -> list[ModuleInfo]:
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
      self.process(eqn, scopes + self._scope_tokens(eqn.source_info))

  def _scope_tokens(self, source_info) -> tuple[str, ...]:
    """Return the module scope tokens of an equation's name stack."""
    # Equations traced in one scope share a name stack object, so caching by
    # identity avoids formatting the stack for every equation.
    name_stack = source_info.name_stack
    cached = self._scope_cache.get(id(name_stack))
    if cached is not None and cached[0] is name_stack:
      return cached[1]
    tokens = _scope_tokens(str(name_stack))
    self._scope_cache[id(name_stack)] = (name_stack, tokens)
    return tokens

  def _in_unit_scope(self, scopes: tuple[str, ...]) -> bool:
    """Check whether any module of `scopes` is a unit module."""
    inside = self._unit_scope_cache.get(scopes)
    if inside is None:
      inside = any(self.modules[t].is_unit for t in scopes if t in self.modules)
      self._unit_scope_cache[scopes] = inside
    return inside

  def _is_inert(self, jaxpr) -> bool:
    """Check that walking `jaxpr` on constant inputs changes nothing.

    Only a unit module's boundary equation makes nodes without activation
    inputs, and only a call whose arity differs from its program's makes
    activations out of constants (see `_walk_call`).
    """
    cached = self._inert_cache.get(id(jaxpr))
    if cached is not None and cached[0] is jaxpr:
      return cached[1]
    inert = True
    for eqn in jaxpr.eqns:
      if eqn.primitive is boundary_p:
        inert = False
        break
      sub = _sub_jaxpr(eqn)
      if sub is None or eqn.primitive.name in _OPAQUE_PRIMITIVES:
        continue
      inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
      if len(inner.invars) != len(eqn.invars) or not self._is_inert(inner):
        inert = False
        break
    self._inert_cache[id(jaxpr)] = (jaxpr, inert)
    return inert

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

    if name == boundary_p.name:
      _handle_unit(self, eqn, kinds, self.modules[eqn.params["token"]])
      return
    if self._in_unit_scope(scopes):
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
    if all(kind == "const" for kind, _ in kinds) and self._is_inert(jaxpr):
      return  # E.g. a parameter initializer: constants in and out.
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

  def _forward_param(self, eqn, refs: Sequence[ParamRef]) -> None:
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
      self.params[out] = ParamRef(ref.path, layout)

  # Parameter nodes.

  def claim_param(self, ref: ParamRef, use: str) -> bool:
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
    self, ref: ParamRef, var_shape: tuple[int, ...], ghn_axes: Sequence[int]
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


def _handle_unit(tracer: Tracer, eqn, kinds, info: ModuleInfo) -> None:
  """Create the nodes of a unit module from its parameters' names."""
  inputs = _union([v for k, v in kinds[1:] if k == "act"])
  out = eqn.outvars[0]

  if info.primitive in _POOL_PRIMITIVES:
    shape = (1, 1, info.window, info.window)
    node = tracer.add_node(Node(info.primitive, shape, name=info.path), inputs)
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
  if mains and tracer.claim_param(ParamRef(mains[0], None), info.primitive):
    main_node = _unit_main_node(tracer, mains[0], info.primitive, inputs)
    frontier = frozenset([main_node])

  if biases and main_node is not None and info.primitive in NORM_PRIMITIVES:
    tracer.nodes[main_node].extra = biases[0]
  elif biases and tracer.claim_param(ParamRef(biases[0], None), "bias"):
    node = tracer.add_node(
      Node(
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


def _unit_main_node(tracer: Tracer, path: str, op: str, inputs) -> int:
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
    Node(
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


def _handle_conv(tracer: Tracer, eqn, kinds, scopes) -> bool:
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
    Node(op, shape, perm, param=rhs.path, name=rhs.path), lhs
  )
  tracer.param_node[rhs.path] = node
  tracer.set_output(eqn, node)
  return True


def _handle_dot(tracer: Tracer, eqn, kinds, scopes) -> bool:
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
    Node("conv", shape, perm, param=ref.path, name=ref.path), acts
  )
  tracer.param_node[ref.path] = node
  tracer.set_output(eqn, node)
  return True


def _handle_attention(tracer: Tracer, eqn, inputs, scopes) -> bool:
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
  msa = tracer.add_node(Node("msa", name="attention"), inputs)
  tracer.msa_nodes.add(msa)
  tracer.set_output(eqn, msa)
  return True


def _handle_add(tracer: Tracer, eqn, kinds, scopes) -> bool:
  """Make a sum, bias or positional-encoding node, or a norm's extra."""
  acts = [v for k, v in kinds if k == "act"]
  refs = [v for k, v in kinds if k == "param"]
  if len(acts) == 2:
    inputs = _union(acts)
    inputs = tracer._absorb_into_norm(inputs, scopes)
    if len(inputs) > 1:
      tracer.set_output(eqn, tracer.add_node(Node("sum", name="sum"), inputs))
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
    Node("bias", (size,), (0,), param=ref.path, name=ref.path), inputs
  )
  tracer.param_node[ref.path] = node
  tracer.set_output(eqn, node)
  return True


def _add_pos_enc(tracer: Tracer, path: str, inputs) -> int:
  """Add a `pos_enc` node and its `sum` with `inputs`; return the sum."""
  shape = tracer.param_shapes[path]
  ndim = len(shape)
  if ndim >= 2:
    # Channels last in Flax, second in GHN layout (1, C, H, W).
    ghn_axes = (0, ndim - 1) + tuple(range(1, ndim - 1))
  else:
    ghn_axes = (0,)
  ghn_shape = tuple(int(shape[a]) for a in ghn_axes)
  node = Node("pos_enc", ghn_shape, _inverse(ghn_axes), param=path, name=path)
  pos = tracer.add_node(node, frozenset())
  tracer.param_node[path] = pos
  return tracer.add_node(Node("sum", name="sum"), inputs | {pos})


def _handle_mul(tracer: Tracer, eqn, kinds, scopes) -> bool:
  """Make a norm, layer-scale or cse node of a product."""
  acts = [v for k, v in kinds if k == "act"]
  refs = [v for k, v in kinds if k == "param"]
  if len(acts) == 2:
    inputs = tracer._absorb_into_norm(_union(acts), scopes)
    if len(inputs) > 1 and tracer._in_primitive_scope(scopes, "cse"):
      tracer.set_output(eqn, tracer.add_node(Node("cse", name="cse"), inputs))
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
      Node(op, (size,), (0,), param=ref.path, name=ref.path), inputs
    )
    tracer.norm_node[owner] = node
    if scopes:
      tracer.norm_scope[node] = scopes[-1]
  else:
    # A learned per-channel multiplier of another module (layer scale).
    node = tracer.add_node(
      Node("ln", (size,), (0,), param=ref.path, name=ref.path), inputs
    )
  tracer.param_node[ref.path] = node
  tracer.set_output(eqn, node)
  return True


def _handle_concat(tracer: Tracer, eqn, kinds, scopes) -> bool:
  acts = [v for k, v in kinds if k == "act"]
  for kind, ref in kinds:
    if kind == "param":
      tracer.mark_unsupported(
        ref.path, "concatenated to activations (e.g. a class token)"
      )
  inputs = _union(acts)
  if len(inputs) > 1:
    node = tracer.add_node(Node("concat", name="concat"), inputs)
    tracer.set_output(eqn, node)
  else:
    tracer._forward(eqn, inputs, scopes)
  return True


def _handle_pool(tracer: Tracer, eqn, kinds, scopes) -> bool:
  if kinds[0][0] != "act":
    return False
  window = tuple(eqn.params["window_dimensions"])
  spatial = tuple(w for w in window[1:-1]) if len(window) > 2 else window
  if all(w == 1 for w in spatial):
    tracer._forward(eqn, kinds[0][1], scopes)
    return True
  op = "max_pool" if eqn.primitive.name == "reduce_window_max" else "avg_pool"
  shape = (1, 1) + tuple(int(w) for w in spatial)
  node = tracer.add_node(Node(op, shape, name=op), kinds[0][1])
  tracer.set_output(eqn, node)
  return True


def _handle_reduce_sum(tracer: Tracer, eqn, kinds, scopes) -> bool:
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
  node = tracer.add_node(Node("glob_avg", name="glob_avg"), inputs)
  tracer.set_output(eqn, node)
  return True


def _in_norm_scope(tracer: Tracer, inputs, scopes) -> bool:
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
  return tuple(p for p in name_stack.split("/") if p.startswith(SCOPE_PREFIX))


def _sub_jaxpr(eqn):
  """Return the called program of a call-like equation, or None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
      return sub
  return None
