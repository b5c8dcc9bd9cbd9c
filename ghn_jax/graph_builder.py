"""Build the computational `Graph` of any Flax linen model by tracing it.

`build_graph` traces `model.apply` with `jax.make_jaxpr` while
`flax.linen.intercept_methods` wraps every module call in a named scope.
Input and variables are abstract, so no FLOPs are spent. One trace both
creates the variables (their initializers run inside the program) and
applies the model; it costs about as much as tracing `model.apply` alone,
half of `model.init` followed by such a trace. `graph_tracer.Tracer` then
walks the equations and applies the rules of the original GHN-2 graph
builder (see `graph_tracer` for the list).

Built graphs are cached in memory and, when a cache folder is set, on disk
for other processes (see `GRAPH_CACHE_DIR_ENV`).

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
import contextlib
import dataclasses
import enum
import functools
import gc
import hashlib
import heapq
import itertools
import math
import os
import pathlib
import sys
import types
import uuid
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ghn_jax import graph as graph_lib
from ghn_jax import graph_tracer, nn_ops
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


def _make_interceptor(modules: dict[str, ModuleInfo]):
  """Return a method interceptor that records modules into `modules`.

  Every module method call runs inside a named scope whose token maps to
  the module in `modules`. The call of a unit module (see `graph_tracer`)
  ends with a boundary equation that shows its inputs and output together.
  """
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

  return interceptor


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
  interceptor = _make_interceptor(modules)

  # Models that draw random numbers (dropout in training mode) get a key;
  # the values do not matter for the graph.
  apply_kwargs.setdefault("rngs", {"dropout": jax.random.key(0)})

  def apply_fn(variables, x):
    # Fused ops would hide the module calls that the graph is made of.
    with nn.intercept_methods(interceptor), nn_ops.unfused():
      out = model.apply(variables, x, mutable=True, **apply_kwargs)
    return _first_leaf(out[0])

  closed = jax.make_jaxpr(apply_fn)(variables, inputs)
  return closed, modules


def trace_model_creating_variables(
  model: nn.Module,
  inputs: jax.ShapeDtypeStruct | jax.Array,
  apply_kwargs: Mapping[str, Any] | None = None,
):
  """Trace `model.apply` on no variables, so that the program creates them.

  One trace replaces `model.init` followed by a trace of `model.apply`:
  with every collection mutable and empty, each `param` and `variable`
  call runs its initializer inside the traced program. This also skips
  the abstract evaluation of every initializer that `apply` does to check
  the shapes of given parameters. The model runs in apply mode
  (`is_initializing()` is False), as in `trace_model`.

  Args:
    model: the Flax module.
    inputs: the model's input (abstract or concrete).
    apply_kwargs: extra keyword arguments of `model.apply`; its `rngs`, if
      any, get a traced `params` key added.

  Returns:
    `(closed_jaxpr, modules, variables)`. The program's inputs are an rng
    key and `inputs`, and its outputs are the model's first output array
    followed by the flattened created variables. `modules` maps each scope
    token to its module, and `variables` is the pytree of created variables
    as `jax.ShapeDtypeStruct`s.
  """
  apply_kwargs = dict(apply_kwargs or {})
  user_rngs = apply_kwargs.pop("rngs", None)
  if user_rngs is not None and not isinstance(user_rngs, Mapping):
    user_rngs = {"params": user_rngs}
  modules: dict[str, ModuleInfo] = {}
  interceptor = _make_interceptor(modules)

  def create_and_apply(key, x):
    # As in `trace_model`, random values do not matter for the graph.
    rngs = dict(user_rngs) if user_rngs is not None else {"dropout": key}
    rngs.setdefault("params", key)
    with nn.intercept_methods(interceptor), nn_ops.unfused():
      out, variables = model.apply(
        {}, x, rngs=rngs, mutable=True, **apply_kwargs
      )
    return _first_leaf(out), variables

  closed, shapes = jax.make_jaxpr(create_and_apply, return_shape=True)(
    jax.random.key(0), inputs
  )
  return closed, modules, shapes[1]


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
  cache_dir: str | os.PathLike | None = None,
) -> tuple[graph_lib.Graph, GraphReport]:
  """Build the GHN-2 computational graph of a Flax model.

  A DeepNets-1M `Network` gets its graph from its config
  (`graph_deepnets`, the same graph ~300x faster) unless `trace` is set.

  Args:
    model: a Flax linen module whose `__call__` takes one input array.
    variables: the model's variables ({'params': ..., 'batch_stats': ...});
      arrays or `jax.ShapeDtypeStruct`s. If None, the traced program
      creates them abstractly (no memory, no FLOPs).
    input_shape: shape of the input, batch axis included, e.g.
      (1, 32, 32, 3).
    input_dtype: dtype of the input.
    apply_kwargs: extra keyword arguments of `model.apply`, e.g.
      {'train': False}.
    strict: raise instead of warning when a parameter cannot be predicted.
    trace: always trace, even a DeepNets-1M `Network`.
    cache: reuse the graph traced earlier for an equal model (Flax modules
      compare by their fields) with the same variable shapes, input and
      apply arguments, from memory and, with a cache folder, from disk.
      Warnings are raised again on reuse.
    cache_dir: folder of the on-disk graph cache, shared by processes;
      None reads the `GHN_JAX_GRAPH_CACHE_DIR` environment variable, and
      without it graphs are cached in memory only. Entries are keyed by
      the model's class and fields and checked against the source files
      that ran while tracing (see `GRAPH_CACHE_DIR_ENV`).

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

  entry = None
  if cache:
    entry = _disk_entry(
      cache_dir, model, variables, input_shape, input_dtype, apply_kwargs
    )
  loaded = _load_cached_graph(entry) if entry is not None else None
  if loaded is not None:
    graph, report = loaded
    _warn_unsupported(report, strict)
  else:
    walked, param_sizes = _trace(
      model, variables, input_shape, input_dtype, apply_kwargs
    )
    graph, report = finish_graph(
      walked.tracer, walked.output_nodes, param_sizes, strict
    )
    if entry is not None:
      _save_cached_graph(entry, graph, report, walked)
  if key is not None:
    _cache[key] = (graph, report)
    if len(_cache) > _CACHE_SIZE:
      _cache.popitem(last=False)
  return graph, report


def _trace(model, variables, input_shape, input_dtype, apply_kwargs):
  """Trace and walk the model; return the walk and each param's size."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype)
  if variables is not None and "params" not in variables:
    raise _no_params_error()
  with _gc_paused():
    walked = _trace_and_walk(model, variables, x, apply_kwargs)
  param_sizes = {
    path: math.prod(np.shape(leaf))
    for path, leaf in _param_leaves(walked.params).items()
  }
  return walked, param_sizes


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


def clear_cache(cache_dir: str | os.PathLike | None = None) -> None:
  """Forget the graphs that `build_graph(..., cache=True)` kept.

  Args:
    cache_dir: also delete the graph files of this on-disk cache folder
      (files named `graph-*.npz`; other files are left alone).
  """
  _cache.clear()
  if cache_dir is None:
    return
  for path in pathlib.Path(cache_dir).glob(f"{_ENTRY_PREFIX}*{_ENTRY_SUFFIX}"):
    path.unlink(missing_ok=True)


# On-disk cache of traced graphs, shared by processes (opt-in).
#
# An entry is one `graph-<sha256 of key>.npz` file (no pickle) in the cache
# folder. The key describes the model's class and fields (recursively, with
# functions and classes by qualified name and closures by their captured
# values), the input shape and dtype, the apply arguments, the shapes and
# dtypes of given variables, and the versions of jax, jaxlib, flax and
# numpy. The entry also lists source files with their modification time and
# size: every file on the Python stack of any traced equation, the files of
# the module classes and described functions, and this builder's files. An
# edit to any of them makes the entry stale, and it is rebuilt. Models that
# cannot be described this way (e.g. a field holding a lambda or an open
# file) are cached in memory only.
# NOTE: an edit to a file that only ran without emitting equations (e.g. a
# helper that computes layer sizes) is not detected; clear the cache then.
GRAPH_CACHE_DIR_ENV = "GHN_JAX_GRAPH_CACHE_DIR"
_ENTRY_PREFIX = "graph-"
_ENTRY_SUFFIX = ".npz"
# Bumped when the entry layout or the graph rules change.
_DISK_FORMAT_VERSION = 1
# Nesting depth at which a model description gives up (cyclic fields).
_MAX_DESCRIBE_DEPTH = 32
# Arrays in model fields up to this size are described by their bytes.
_MAX_DESCRIBED_ARRAY_BYTES = 1 << 20
_BUILDER_FILES = (__file__, graph_tracer.__file__, graph_lib.__file__)


@dataclasses.dataclass(frozen=True)
class _DiskEntry:
  """Location, key and known source files of one on-disk cache entry."""

  path: pathlib.Path
  key: str
  files: frozenset[str]


class _NotDescribable(Exception):
  """A value that the on-disk cache key cannot describe stably."""


def default_cache_dir() -> pathlib.Path | None:
  """Return the on-disk cache folder set by `GHN_JAX_GRAPH_CACHE_DIR`."""
  value = os.environ.get(GRAPH_CACHE_DIR_ENV)
  return pathlib.Path(value).expanduser() if value else None


def _disk_entry(
  cache_dir, model, variables, input_shape, input_dtype, apply_kwargs
) -> _DiskEntry | None:
  """Return the on-disk entry of these arguments, or None if not cached."""
  folder = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  if folder is None:
    return None
  files: set[str] = set()
  try:
    parts = [
      f"format {_DISK_FORMAT_VERSION}",
      "versions " + _describe(_library_versions(), files),
      "model " + _describe(model, files),
      f"input {tuple(int(d) for d in input_shape)} {np.dtype(input_dtype)}",
      "apply_kwargs " + _describe(dict(apply_kwargs or {}), files),
      "variables " + _describe_variables(variables),
    ]
  except _NotDescribable as e:
    logging.info("Graph not cached on disk: %s", e)
    return None
  key = "\n".join(parts)
  digest = hashlib.sha256(key.encode()).hexdigest()
  path = folder / f"{_ENTRY_PREFIX}{digest}{_ENTRY_SUFFIX}"
  return _DiskEntry(path, key, frozenset(files))


def _library_versions() -> dict[str, str]:
  import jaxlib  # noqa: PLC0415 (only its version is needed)

  return {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "numpy": np.__version__,
  }


def _describe_variables(variables) -> str:
  if variables is None:
    return "created"
  return repr(sorted(_leaf_signatures(dict(variables)).items()))


def _describe(value, files: set[str], depth: int = 0) -> str:
  """Describe `value` by a string that is equal across processes.

  Source files of described classes and functions are added to `files`.

  Raises:
    _NotDescribable: for values without such a description.
  """
  if depth > _MAX_DESCRIBE_DEPTH:
    raise _NotDescribable("model fields nest too deeply")
  depth += 1
  if value is None or isinstance(value, (bool, int, float, complex, str)):
    return repr(value)
  if isinstance(value, bytes):
    return repr(value)
  if isinstance(value, enum.Enum):
    return f"{_describe(type(value), files, depth)}.{value.name}"
  if isinstance(value, np.dtype):
    return f"dtype({value.str})"
  if isinstance(value, (tuple, list)):
    items = ",".join(_describe(v, files, depth) for v in value)
    return f"{type(value).__name__}({items})"
  if isinstance(value, Mapping):
    items = sorted(
      (_describe(k, files, depth), _describe(v, files, depth))
      for k, v in value.items()
    )
    return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
  if isinstance(value, (set, frozenset)):
    return "set(" + ",".join(sorted(_describe(v, files, depth) for v in value))
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _describe_array(value)
  if isinstance(value, type):
    return _qualified_name(value, files)
  if isinstance(value, functools.partial):
    return (
      f"partial({_describe(value.func, files, depth)},"
      f"{_describe(value.args, files, depth)},"
      f"{_describe(value.keywords, files, depth)})"
    )
  if dataclasses.is_dataclass(value):
    fields = [
      f"{f.name}={_describe(getattr(value, f.name), files, depth)}"
      for f in dataclasses.fields(value)
      if f.name != "parent"  # A Flax module's parent scope or module.
    ]
    return f"{_qualified_name(type(value), files)}({','.join(fields)})"
  if isinstance(value, types.FunctionType):
    return _describe_function(value, files, depth)
  if isinstance(value, types.MethodType):
    owner = _describe(value.__self__, files, depth)
    return f"{owner}.{_describe(value.__func__, files, depth)}"
  if callable(value) and hasattr(value, "__qualname__"):
    # Builtins and wrapped functions, e.g. `jax.nn.relu` (a custom_jvp).
    return _qualified_name(value, files)
  raise _NotDescribable(f"cannot describe a {type(value).__name__}")


def _describe_array(value) -> str:
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    return f"prng_key{tuple(value.shape)}"  # Values never change a graph.
  array = np.asarray(value)
  if array.nbytes > _MAX_DESCRIBED_ARRAY_BYTES:
    raise _NotDescribable(f"array of {array.nbytes} bytes in the model")
  digest = hashlib.sha256(array.tobytes()).hexdigest()
  return f"array({array.dtype.str},{array.shape},{digest})"


def _describe_function(fn: types.FunctionType, files: set[str], depth: int):
  """Describe a function by name, defaults and captured values."""
  name = _qualified_name(fn, files, allow_local=True)
  cells = []
  for cell in fn.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # An empty cell.
      cells.append("<empty>")
      continue
    cells.append(_describe(contents, files, depth))
  defaults = _describe(fn.__defaults__ or (), files, depth)
  kwdefaults = _describe(fn.__kwdefaults__ or {}, files, depth)
  return f"{name}[{','.join(cells)}]({defaults},{kwdefaults})"


def _qualified_name(obj, files: set[str], allow_local: bool = False) -> str:
  """Return `module.qualname` of a class or function; note its file.

  Classes and callables defined inside a function may differ between calls
  of that function under one name, so they are described only where
  `allow_local` is set (functions, whose captured values are described).
  """
  module = getattr(obj, "__module__", None)
  qualname = getattr(obj, "__qualname__", None)
  if not module or not qualname:
    raise _NotDescribable(f"{obj!r} has no qualified name")
  if "<lambda>" in qualname:
    raise _NotDescribable(f"lambda {module}.{qualname}")
  if "<locals>" in qualname and not allow_local:
    raise _NotDescribable(f"{module}.{qualname} is defined in a function")
  source = _source_file(obj)
  if source is None:
    raise _NotDescribable(f"{module}.{qualname} has no source file")
  files.add(source)
  return f"{module}.{qualname}"


def _source_file(obj) -> str | None:
  """Return the file that defines a class or function, if it has one."""
  module = sys.modules.get(getattr(obj, "__module__", None) or "")
  path = getattr(module, "__file__", None)
  if path is None and isinstance(obj, types.FunctionType):
    path = obj.__code__.co_filename
  if path is None or not os.path.isfile(path):
    return None
  return os.path.abspath(path)


def _traced_source_files(walked: _Walked) -> set[str]:
  """Return the files of the code that emitted the program's equations."""
  files = set(_BUILDER_FILES)
  for info in walked.modules.values():
    source = _source_file(info.cls)
    if source is not None:
      files.add(source)
  seen_jaxprs = set()
  stack = [walked.jaxpr]
  while stack:
    jaxpr = stack.pop()
    if id(jaxpr) in seen_jaxprs:
      continue
    seen_jaxprs.add(id(jaxpr))
    for eqn in jaxpr.eqns:
      traceback = eqn.source_info.traceback
      if traceback is not None:
        codes, _ = traceback.raw_frames()
        files.update(code.co_filename for code in codes)
      stack.extend(_jaxprs_in_params(eqn.params))
  return {os.path.abspath(f) for f in files if os.path.isfile(f)}


def _jaxprs_in_params(params: Mapping[str, Any]) -> list:
  found = []
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if hasattr(v, "eqns"):
        found.append(v)
      elif hasattr(getattr(v, "jaxpr", None), "eqns"):
        found.append(v.jaxpr)
  return found


def _file_stamps(files) -> tuple[list[str], np.ndarray]:
  """Return the files in order and their (mtime in ns, size) stamps."""
  names = sorted(files)
  stamps = np.zeros((len(names), 2), np.int64)
  for i, name in enumerate(names):
    stat = os.stat(name)
    stamps[i] = (stat.st_mtime_ns, stat.st_size)
  return names, stamps


# String sections of an entry's "strings" array, in order; "counts" holds
# their lengths followed by the number of edges.
_STRING_SECTIONS = (
  "node_params",
  "node_extra_params",
  "node_names",
  "predicted_params",
  "pruned_params",
  "unsupported_paths",
  "unsupported_reasons",
  "source_files",
)


def _save_cached_graph(
  entry: _DiskEntry, graph: graph_lib.Graph, report: GraphReport, walked
) -> None:
  """Write an on-disk cache entry; log instead of failing.

  The entry packs its fields into four arrays (key, strings, counts,
  integers), because reading each array of an `.npz` costs ~0.15 ms.
  """
  try:
    names, stamps = _file_stamps(entry.files | _traced_source_files(walked))
    sections = {
      "node_params": graph.node_params,
      "node_extra_params": graph.node_extra_params,
      "node_names": graph.node_names,
      "predicted_params": report.predicted_params,
      "pruned_params": report.pruned_params,
      "unsupported_paths": tuple(report.unsupported_params.keys()),
      "unsupported_reasons": tuple(report.unsupported_params.values()),
      "source_files": tuple(names),
    }
    strings = [s for name in _STRING_SECTIONS for s in sections[name]]
    counts = [len(sections[name]) for name in _STRING_SECTIONS]
    integers = [
      graph.node_ops,
      graph.node_shapes.ravel(),
      graph.node_param_perm.ravel(),
      graph.senders,
      graph.receivers,
      [report.num_params, report.num_predicted],
      stamps.ravel(),
    ]
    arrays = {
      "key": np.asarray(entry.key, dtype=np.str_),
      "strings": np.asarray(strings, dtype=np.str_).reshape(-1),
      "counts": np.asarray(counts + [graph.num_edges], np.int64),
      "integers": np.concatenate(
        [np.asarray(part, np.int64).ravel() for part in integers]
      ),
    }
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that readers never see a partial file. Opening
    # a unique name with mode "x" (not tempfile, which creates files with
    # mode 0o600) gives the file the usual 0o666 minus the umask.
    tmp = entry.path.with_name(f"{entry.path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "xb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, entry.path)
  except OSError as e:
    logging.warning("Could not write the graph cache %s: %s", entry.path, e)


def _split(values, sizes: Sequence[int]) -> list:
  """Split `values` into consecutive parts of the given sizes."""
  if sum(sizes) != len(values):
    raise ValueError(f"{len(values)} values do not split into {sizes}.")
  bounds = np.cumsum([0, *sizes])
  return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _load_cached_graph(
  entry: _DiskEntry,
) -> tuple[graph_lib.Graph, GraphReport] | None:
  """Read an on-disk cache entry; None if missing, stale or unreadable."""
  try:
    with np.load(entry.path, allow_pickle=False) as data:
      if str(data["key"]) != entry.key:
        return None  # Another key with the same SHA-256 digest.
      strings = data["strings"].tolist()
      counts = data["counts"].tolist()
      integers = data["integers"]
    sizes = dict(zip(_STRING_SECTIONS, counts[:-1], strict=True))
    sections = dict(
      zip(
        _STRING_SECTIONS,
        _split(strings, counts[:-1]),
        strict=True,
      )
    )
    num_nodes = sizes["node_params"]
    num_edges = counts[-1]
    num_files = sizes["source_files"]
    ops, shapes, perms, senders, receivers, totals, stamps = _split(
      integers,
      [
        num_nodes,
        _SHAPE_SLOTS * num_nodes,
        _SHAPE_SLOTS * num_nodes,
        num_edges,
        num_edges,
        2,
        2 * num_files,
      ],
    )
    stamps = stamps.reshape(num_files, 2)
    if not _sources_unchanged(sections["source_files"], stamps):
      logging.info("Graph cache %s is stale: sources changed.", entry.path)
      return None
    graph = graph_lib.Graph(
      node_ops=ops.astype(np.int32),
      node_shapes=shapes.reshape(num_nodes, _SHAPE_SLOTS),
      node_params=tuple(sections["node_params"]),
      node_extra_params=tuple(sections["node_extra_params"]),
      node_param_perm=perms.reshape(num_nodes, _SHAPE_SLOTS).astype(np.int32),
      senders=senders.astype(np.int32),
      receivers=receivers.astype(np.int32),
      node_names=tuple(sections["node_names"]),
    )
    graph.validate()
    report = GraphReport(
      predicted_params=tuple(sections["predicted_params"]),
      pruned_params=tuple(sections["pruned_params"]),
      unsupported_params=dict(
        zip(
          sections["unsupported_paths"],
          sections["unsupported_reasons"],
          strict=True,
        )
      ),
      num_params=int(totals[0]),
      num_predicted=int(totals[1]),
    )
  except FileNotFoundError:
    return None
  except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
    logging.warning("Ignoring unreadable graph cache %s: %s", entry.path, e)
    return None
  return graph, report


def _sources_unchanged(names, stamps) -> bool:
  for name, (mtime_ns, size) in zip(names, stamps, strict=True):
    try:
      stat = os.stat(name)
    except OSError:
      return False
    if stat.st_mtime_ns != mtime_ns or stat.st_size != size:
      return False
  return True


def _is_deepnets_network(model: nn.Module, input_shape) -> bool:
  """Check whether `model` is a DeepNets-1M `Network` fed its own input."""
  # A model can only be a `Network` once its module is imported; not
  # importing it here saves ~50 ms for other models.
  net = sys.modules.get("ghn_jax.deepnets1m.net")
  if net is None or type(model) is not net.Network:
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
  cache_dir: str | os.PathLike | None = None,
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
    cache_dir=cache_dir,
  )
  return graph


def _no_params_error() -> ValueError:
  return ValueError(
    "variables has no 'params' collection: the model has no parameters "
    "for a GHN to predict."
  )


@contextlib.contextmanager
def _gc_paused():
  """Pause Python's cyclic garbage collector, if enabled, inside the block.

  Tracing allocates many objects and few cycles; collections triggered by
  the allocations took ~10% of a ResNet-50 trace. The paused block's
  garbage is collected once the collector runs again.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


@dataclasses.dataclass(frozen=True)
class _Walked:
  """A walked program: nodes, output nodes, params pytree, program."""

  tracer: Tracer
  output_nodes: frozenset[int]
  params: Any
  jaxpr: Any
  modules: Mapping[str, ModuleInfo]


def _trace_and_walk(model, variables, x, apply_kwargs) -> _Walked:
  """Trace the model and walk its program, in one trace where possible."""
  walked = _walk_creating_variables(model, variables, x, apply_kwargs)
  if walked is None:
    walked = _walk_given_variables(model, variables, x, apply_kwargs)
  return walked


def _walk_given_variables(model, variables, x, apply_kwargs) -> _Walked:
  """Trace and walk with the variables as program inputs.

  Variables that are not given are created first by an abstract
  `model.init`. This costs about twice the one-trace path and is taken
  only where that path does not apply.
  """
  if variables is None:
    variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, **dict(apply_kwargs or {})),
      x,
    )
  if "params" not in variables:
    raise _no_params_error()
  abstract = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), dict(variables)
  )
  closed, modules = trace_model(model, abstract, x, apply_kwargs)
  jaxpr = closed.jaxpr
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  num_vars = len(leaves)
  tracer, output_nodes = _walk_traced(
    jaxpr,
    jaxpr.invars[:num_vars],
    leaves,
    jaxpr.invars[num_vars],
    jaxpr.outvars[0],
    modules,
  )
  return _Walked(tracer, output_nodes, abstract["params"], jaxpr, modules)


def _walk_creating_variables(model, variables, x, apply_kwargs):
  """Walk the one-trace program of `trace_model_creating_variables`.

  Returns:
    the walk as `_trace_and_walk` returns it, or None where the program
    would not walk like one with the variables as inputs. That is the case
    when the given `variables` differ from the created ones, or parameters
    share one value, or a parameter is computed from the model's input or
    from another parameter. Data-dependent initializers and modules lifted
    by `nn.jit`, `nn.remat` or `nn.scan` compute parameters so.
  """
  closed, modules, created = trace_model_creating_variables(
    model, x, apply_kwargs
  )
  if "params" not in created:
    if variables is None:
      raise _no_params_error()
    return None
  if variables is not None and not _same_variables(variables, created):
    return None
  jaxpr = closed.jaxpr
  leaves = jax.tree_util.tree_flatten_with_path(created)[0]
  variable_vars = jaxpr.outvars[1:]
  param_vars = [
    var
    for var, (key_path, _) in zip(variable_vars, leaves, strict=True)
    if _key_names(key_path)[0] == "params"
  ]
  input_var = jaxpr.invars[1]
  if not _created_from_constants(jaxpr, param_vars, input_var):
    return None
  tracer, output_nodes = _walk_traced(
    jaxpr, variable_vars, leaves, input_var, jaxpr.outvars[0], modules
  )
  return _Walked(tracer, output_nodes, created["params"], jaxpr, modules)


def _key_names(key_path) -> tuple[str, ...]:
  """Return the names of a pytree key path, e.g. ('params', 'fc', 'bias')."""
  return tuple(str(getattr(k, "key", k)) for k in key_path)


def _leaf_signatures(variables) -> dict[tuple[str, ...], tuple]:
  """Map each variable's key names to its shape and dtype."""
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {
    _key_names(key_path): (np.shape(leaf), np.dtype(leaf.dtype))
    for key_path, leaf in leaves
  }


def _same_variables(given_variables, created_variables) -> bool:
  """Check that tracing on the given variables would see the created ones.

  The parameters must agree exactly. Other given variables must be among
  the created ones with equal shapes and dtypes. Missing ones are created
  by `apply` in either trace, because all collections are mutable.
  """
  given = _leaf_signatures(dict(given_variables))
  created = _leaf_signatures(created_variables)
  given_params = {k: v for k, v in given.items() if k[0] == "params"}
  created_params = {k: v for k, v in created.items() if k[0] == "params"}
  if given_params != created_params:
    return False
  return all(created.get(k) == v for k, v in given.items())


def _created_from_constants(jaxpr, param_vars, input_var) -> bool:
  """Check that each parameter is a separate value computed from constants.

  Only then does a walk from the input treat the parameters as it treats
  program inputs: as separate values that do not depend on the input.
  """
  var_type = jax.extend.core.Var
  if not all(isinstance(v, var_type) for v in param_vars):
    return False  # A literal constant.
  params = set(param_vars)
  if len(params) != len(param_vars) or params & set(jaxpr.invars):
    return False
  dependent = {input_var} | params
  for eqn in jaxpr.eqns:
    if any(isinstance(v, var_type) and v in dependent for v in eqn.invars):
      if params.intersection(eqn.outvars):
        return False
      dependent.update(eqn.outvars)
  return True


def _walk_traced(
  jaxpr, variable_vars, leaves_with_paths, input_var, output_var, modules
):
  """Walk a traced program from its input; return tracer and outputs.

  Args:
    jaxpr: the program.
    variable_vars: the program's value of each variable leaf.
    leaves_with_paths: `tree_flatten_with_path` of the variables.
    input_var: the model's input in the program.
    output_var: the model's output in the program.
    modules: the module behind each scope token.
  """
  param_paths = {}
  param_shapes = {}
  for var, (key_path, leaf) in zip(
    variable_vars, leaves_with_paths, strict=True
  ):
    keys = _key_names(key_path)
    if keys[0] != "params":
      continue
    path = "/".join(keys[1:])
    param_paths[var] = path
    param_shapes[path] = tuple(leaf.shape)
  tracer = Tracer(param_paths, param_shapes, modules)
  input_node = tracer.add_node(Node("input", name="input"), frozenset())
  tracer.frontier[input_var] = frozenset([input_node])
  tracer.walk(jaxpr)
  kind, frontier = tracer._value_kind(output_var)
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
