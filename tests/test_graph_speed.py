"""Tests of the fast graph-building paths: one-trace walk and disk cache.

Each fast path must give exactly the graph and report of the plain path
(trace `model.apply` on given or `model.init`-created variables).
"""

import gc
import importlib.util
import math
import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghn_jax import graph_builder, zoo
from ghn_jax.deepnets1m import net, sampler

INPUT = (1, 8, 8, 3)
_SHARED_KERNEL = np.ones((192, 4), np.float32)


# Helpers.


def _assert_same_graph(a, b):
  for field in (
    "node_ops",
    "node_shapes",
    "node_param_perm",
    "senders",
    "receivers",
  ):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), field)
  assert a.node_params == b.node_params
  assert a.node_extra_params == b.node_extra_params
  assert a.node_names == b.node_names


def _graph_of(walked):
  """Finish a walk into (graph, report), without warnings."""
  sizes = {
    path: math.prod(np.shape(leaf))
    for path, leaf in graph_builder._param_leaves(walked.params).items()
  }
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", graph_builder.UnsupportedLayerWarning)
    return graph_builder.finish_graph(
      walked.tracer, walked.output_nodes, sizes, strict=False
    )


def _plain_graph(model, shape=INPUT, variables=None, apply_kwargs=None):
  """Build by tracing `apply` on given or `model.init`-created variables."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  walked = graph_builder._walk_given_variables(
    model, variables, x, apply_kwargs
  )
  return _graph_of(walked)


def _one_trace_walk(model, shape=INPUT, variables=None, apply_kwargs=None):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return graph_builder._walk_creating_variables(
    model, variables, x, apply_kwargs
  )


def _build(model, shape=INPUT, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", graph_builder.UnsupportedLayerWarning)
    return graph_builder.build_graph_with_report(
      model, input_shape=shape, **kwargs
    )


# Models.


class _ConvBnDense(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


class _SingleDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))


class _SharedInitValue(nn.Module):
  """Two parameters whose initializer returns the same array object."""

  @nn.compact
  def __call__(self, x):
    a = self.param("a", lambda rng, s: jnp.asarray(_SHARED_KERNEL), (192, 4))
    b = self.param("b", lambda rng, s: jnp.asarray(_SHARED_KERNEL), (192, 4))
    h = x.reshape(x.shape[0], -1)
    return h @ a + h @ b


class _DataDependentInit(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    w = self.param("w", lambda rng: jnp.ones((h.shape[-1], 2)) * h.mean())
    return h @ w


class _JitLifted(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.jit(nn.Dense)(8, name="lifted")(x.reshape(x.shape[0], -1))
    return nn.Dense(2)(nn.relu(h))


class _RematLifted(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.remat(nn.Conv)(4, (3, 3), name="lifted")(x)
    return nn.Dense(2)(h.mean((1, 2)))


class _ScalarParams(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, ())
    return nn.Dense(2)(x.reshape(x.shape[0], -1) * scale)


class _Embedding(nn.Module):
  @nn.compact
  def __call__(self, x):
    tokens = x.reshape(x.shape[0], -1).astype(jnp.int32) % 7
    h = nn.Embed(7, 4, name="embed")(tokens)
    return nn.Dense(2, name="head")(h.mean(1))


class _WithActivation(nn.Module):
  activation: object = nn.relu
  kernel_init: object = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    h = self.activation(x.reshape(x.shape[0], -1))
    return nn.Dense(2, kernel_init=self.kernel_init)(h)


def _deepnets_network():
  rng = sampler.split_rng("train", 0)
  config = next(iter(sampler.sample_architectures("train", 1, rng))).config
  return net.Network(config), (1, config.input_size, config.input_size, 3)


# One trace that creates the variables.


@pytest.mark.parametrize(
  "name", ["conv_bn", "conv_bn_eval", "resnet18", "vit", "deepnets"]
)
def test_one_trace_equals_plain_trace(name):
  apply_kwargs = None
  shape = INPUT
  if name.startswith("conv_bn"):
    model = _ConvBnDense()
    apply_kwargs = {"train": name == "conv_bn"}
  elif name == "vit":
    model, shape = zoo.ViT(depth=1, dim=32, num_heads=4, mlp_dim=64), INPUT
  elif name == "deepnets":
    model, shape = _deepnets_network()
  else:
    model, shape = zoo.create_model(name)
  walked = _one_trace_walk(model, shape, apply_kwargs=apply_kwargs)
  assert walked is not None
  graph, report = _graph_of(walked)
  plain_graph, plain_report = _plain_graph(model, shape, None, apply_kwargs)
  _assert_same_graph(graph, plain_graph)
  assert report == plain_report


@pytest.mark.parametrize(
  "model",
  [
    _SharedInitValue(),
    _DataDependentInit(),
    _JitLifted(),
    _RematLifted(),
    _ScalarParams(),
  ],
  ids=["shared_value", "data_dependent", "jit", "remat", "scalar"],
)
def test_one_trace_declines_ambiguous_params(model):
  assert _one_trace_walk(model) is None
  graph, report = _build(model, cache=False)
  plain_graph, plain_report = _plain_graph(model)
  _assert_same_graph(graph, plain_graph)
  assert report == plain_report


def test_given_variables_equal_to_created_use_one_trace():
  model = _ConvBnDense()
  x = jax.ShapeDtypeStruct(INPUT, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  walked = _one_trace_walk(model, variables=variables)
  assert walked is not None
  only_params = {"params": variables["params"]}
  assert _one_trace_walk(model, variables=only_params) is not None
  graph, _ = _graph_of(walked)
  plain_graph, _ = _plain_graph(model, variables=variables)
  _assert_same_graph(graph, plain_graph)


def test_given_variables_of_other_dtype_trace_plainly():
  model = _ConvBnDense()
  x = jax.ShapeDtypeStruct(INPUT, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  half = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), variables
  )
  assert _one_trace_walk(model, variables=half) is None
  graph, report = _build(model, variables=half, cache=False)
  plain_graph, plain_report = _plain_graph(model, variables=half)
  _assert_same_graph(graph, plain_graph)
  assert report == plain_report


def test_given_extra_param_traces_plainly():
  model = _SingleDense()
  variables = model.init(jax.random.key(0), jnp.ones(INPUT))
  params = dict(variables["params"])
  params["unused"] = {"kernel": jnp.ones((2, 2))}
  assert _one_trace_walk(model, variables={"params": params}) is None
  _, report = _build(model, variables={"params": params}, cache=False)
  assert report.pruned_params == ("unused/kernel",)


def test_one_trace_single_node_model():
  walked = _one_trace_walk(_SingleDense())
  graph, report = _graph_of(walked)
  assert graph.num_nodes == 2
  np.testing.assert_array_equal(graph.senders, [0])
  np.testing.assert_array_equal(graph.receivers, [1])
  assert report.num_predicted == 192 * 3


class _NoParams(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(x)


def test_model_without_params_rejected_by_one_trace():
  with pytest.raises(ValueError, match="no parameters"):
    _one_trace_walk(_NoParams())


def test_build_restores_garbage_collector():
  assert gc.isenabled()
  _build(_SingleDense(), cache=False)
  assert gc.isenabled()
  with pytest.raises(ValueError, match="no parameters"):
    _build(_NoParams(), cache=False)
  assert gc.isenabled()
  gc.disable()
  try:
    _build(_SingleDense(), cache=False)
    assert not gc.isenabled()
  finally:
    gc.enable()


# On-disk cache.


def _entries(folder):
  return sorted(p.name for p in folder.glob("graph-*.npz"))


def _forbid_tracing(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("traced although the disk cache has the graph")

  monkeypatch.setattr(graph_builder, "_trace_and_walk", fail)


def test_disk_cache_reuses_graph(tmp_path, monkeypatch):
  model, shape = zoo.create_model("resnet18")
  graph_builder.clear_cache()
  first, first_report = _build(model, shape, cache_dir=tmp_path)
  assert len(_entries(tmp_path)) == 1
  graph_builder.clear_cache()
  _forbid_tracing(monkeypatch)
  second, second_report = _build(model, shape, cache_dir=tmp_path)
  _assert_same_graph(first, second)
  assert first_report == second_report
  assert second.node_shapes.dtype == first.node_shapes.dtype
  assert second.senders.dtype == first.senders.dtype


def test_disk_cache_single_node_round_trip(tmp_path, monkeypatch):
  graph_builder.clear_cache()
  first, first_report = _build(_SingleDense(), cache_dir=tmp_path)
  graph_builder.clear_cache()
  _forbid_tracing(monkeypatch)
  second, second_report = _build(_SingleDense(), cache_dir=tmp_path)
  _assert_same_graph(first, second)
  assert second_report == first_report
  assert second_report.unsupported_params == {}


def test_disk_cache_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(graph_builder.GRAPH_CACHE_DIR_ENV, str(tmp_path))
  assert graph_builder.default_cache_dir() == tmp_path
  graph_builder.clear_cache()
  _build(_SingleDense())
  assert len(_entries(tmp_path)) == 1


def test_disk_cache_off_by_default(tmp_path, monkeypatch):
  monkeypatch.delenv(graph_builder.GRAPH_CACHE_DIR_ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  assert graph_builder.default_cache_dir() is None
  graph_builder.clear_cache()
  _build(_SingleDense())
  assert list(tmp_path.iterdir()) == []


def test_disk_cache_not_written_without_cache(tmp_path):
  _build(_SingleDense(), cache=False, cache_dir=tmp_path)
  assert _entries(tmp_path) == []


def test_disk_cache_keys_input_and_kwargs(tmp_path):
  graph_builder.clear_cache()
  model = _ConvBnDense()
  _build(model, cache_dir=tmp_path)
  _build(model, (2, 8, 8, 3), cache_dir=tmp_path)
  _build(model, cache_dir=tmp_path, apply_kwargs={"train": False})
  _build(_WithActivation(nn.gelu), cache_dir=tmp_path)
  _build(_WithActivation(nn.relu), cache_dir=tmp_path)
  # Initializers are closures, described by their captured values.
  scaled = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  _build(_WithActivation(nn.relu, scaled), cache_dir=tmp_path)
  assert len(_entries(tmp_path)) == 6


def test_disk_cache_skips_undescribable_model(tmp_path):
  graph_builder.clear_cache()
  model = _WithActivation(lambda x: nn.relu(x))
  graph, _ = _build(model, cache_dir=tmp_path)
  assert graph.num_nodes == 3
  assert _entries(tmp_path) == []


def test_disk_cache_skips_class_defined_in_function(tmp_path):
  def make_model(features):
    class Local(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(features)(x.reshape(x.shape[0], -1))

    return Local()

  graph_builder.clear_cache()
  graph, _ = _build(make_model(3), cache_dir=tmp_path)
  assert graph.node_shapes[1, 0] == 3
  assert _entries(tmp_path) == []
  graph, _ = _build(make_model(5), cache_dir=tmp_path)
  assert graph.node_shapes[1, 0] == 5


def test_disk_cache_warns_again_on_load(tmp_path):
  graph_builder.clear_cache()
  _build(_Embedding(), cache_dir=tmp_path)
  graph_builder.clear_cache()
  with pytest.warns(graph_builder.UnsupportedLayerWarning, match="embed"):
    graph_builder.build_graph(
      _Embedding(), input_shape=INPUT, cache_dir=tmp_path
    )
  graph_builder.clear_cache()
  with pytest.raises(ValueError, match="embed/embedding"):
    graph_builder.build_graph(
      _Embedding(), input_shape=INPUT, cache_dir=tmp_path, strict=True
    )


def test_disk_cache_rebuilds_corrupt_entry(tmp_path):
  graph_builder.clear_cache()
  first, _ = _build(_ConvBnDense(), cache_dir=tmp_path)
  (entry,) = tmp_path.glob("graph-*.npz")
  entry.write_bytes(b"not an npz file")
  graph_builder.clear_cache()
  second, _ = _build(_ConvBnDense(), cache_dir=tmp_path)
  _assert_same_graph(first, second)
  graph_builder.clear_cache()
  third, _ = _build(_ConvBnDense(), cache_dir=tmp_path)
  _assert_same_graph(first, third)


_MODEL_SOURCE = """
import flax.linen as nn


class EditedModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense({features})(x.reshape(x.shape[0], -1))
"""


def _import_model_file(path, features):
  path.write_text(_MODEL_SOURCE.format(features=features))
  name = f"edited_model_{features}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module.EditedModel()


def test_disk_cache_stale_after_source_edit(tmp_path, monkeypatch):
  folder = tmp_path / "cache"
  source = tmp_path / "edited_model.py"
  graph_builder.clear_cache()
  old_model = _import_model_file(source, 3)
  graph, _ = _build(old_model, cache_dir=folder)
  assert graph.node_shapes[1, 0] == 3

  # The same class name and fields, but the file now defines 5 features.
  new_model = _import_model_file(source, 5)
  stat = source.stat()
  os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  monkeypatch.setattr(type(new_model), "__module__", "edited_model_3")
  sys.modules["edited_model_3"] = sys.modules["edited_model_5"]
  graph_builder.clear_cache()
  graph, _ = _build(new_model, cache_dir=folder)
  assert graph.node_shapes[1, 0] == 5
  assert len(_entries(folder)) == 1


def test_clear_cache_deletes_only_entries(tmp_path):
  graph_builder.clear_cache()
  _build(_SingleDense(), cache_dir=tmp_path)
  other = tmp_path / "notes.txt"
  other.write_text("kept")
  graph_builder.clear_cache(tmp_path)
  assert _entries(tmp_path) == []
  assert other.read_text() == "kept"


@pytest.mark.slow
def test_disk_cache_shared_by_processes(tmp_path):
  script = (
    "from ghn_jax import graph_builder, zoo\n"
    "model, shape = zoo.create_model('resnet18')\n"
    f"g = graph_builder.build_graph(model, input_shape=shape, "
    f"cache_dir={str(tmp_path)!r})\n"
    "print(g.num_nodes, g.num_edges)\n"
  )
  outputs = [
    subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
    for _ in range(2)
  ]
  assert outputs[0] == outputs[1]
  assert len(_entries(tmp_path)) == 1
