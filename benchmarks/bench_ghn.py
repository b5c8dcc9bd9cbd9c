"""Speed of GHN-2 parameter prediction, against the original (ppuda).

Baselines are the original's figures on the same 2-core machine (ppuda,
torch 2.14, randomly initialised GHN-2 with the CIFAR-10 configuration,
medians of clean runs on an idle machine):
  - ResNet-50 (CIFAR-adjusted, 23.5M parameters): `ghn(model)` 0.81 s (graph
    construction 0.22 s included), with a prebuilt graph 0.78 s, under
    `torch.no_grad()` 0.63 s;
  - one DeepNets-1M training network (typical, median 139 nodes): GHN
    forward 0.63 s;
  - a meta-batch of 8 DeepNets-1M training networks (1,462 nodes): GHN
    forward 4.49 s, backward through the GHN 4.25 s.

Rows (name, value, unit, baseline):
  - ResNet-50: first call (compile included), first call of a process that
    finds the program in JAX's persistent compilation cache, and steady
    state, with and without building the graph;
  - each reference graph in `GHN_REFERENCE_DIR` (DeepNets-1M-style networks
    and others): first call and steady state;
  - a meta-batch of 8 sampled DeepNets-1M training networks: GHN forward,
    and forward + backward (vector-Jacobian product with respect to the GHN
    parameters, from the decoder outputs).

Usage: `python benchmarks/bench_ghn.py` or `python benchmarks/run.py ghn`.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from jax._src import compilation_cache

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ghn_jax import ghn as ghn_lib  # noqa: E402
from ghn_jax import ghn_inputs, graph_builder, graph_deepnets, zoo  # noqa: E402
from ghn_jax.deepnets1m import sampler  # noqa: E402

REPEATS = 7
META_BATCH = 8
# The original's figures (seconds) on the same 2-core machine.
BASELINE_RESNET50_S = 0.81
BASELINE_RESNET50_PREBUILT_S = 0.78
BASELINE_RESNET50_NO_GRAD_S = 0.63
BASELINE_ONE_NETWORK_S = 0.63
BASELINE_META_BATCH_FORWARD_S = 4.49
BASELINE_META_BATCH_BACKWARD_S = 4.25
REFERENCE_DIR = pathlib.Path(
  os.environ.get(
    "GHN_REFERENCE_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "ghn2_reference",
  )
)


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def _median(fn, repeats: int = REPEATS) -> float:
  return statistics.median(_timed(fn)[0] for _ in range(repeats))


def _fresh_compile_caches() -> None:
  """Forget compiled GHN programs so the next call compiles again."""
  ghn_lib._jitted_apply.cache_clear()
  jax.clear_caches()


def _first_call_with_disk_cache(fn) -> float:
  """Time `fn` after its compiled program was written to JAX's disk cache.

  This is the first call of a new process on a machine that has compiled
  the same bucket before (JAX's persistent compilation cache).
  """
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  saved = {name: getattr(jax.config, name) for name in names}
  with tempfile.TemporaryDirectory() as cache_dir:
    try:
      jax.config.update("jax_compilation_cache_dir", cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
      _fresh_compile_caches()
      _timed(fn)
      _fresh_compile_caches()
      seconds, _ = _timed(fn)
    finally:
      for name, value in saved.items():
        jax.config.update(name, value)
      # JAX keeps the cache object of the first directory it used; drop it
      # so that later compiles do not write into the deleted directory.
      compilation_cache.reset_cache()
  return seconds


def _resnet_rows(ghn, variables) -> list[tuple]:
  model, shape = zoo.create_model("resnet50")

  def build():
    return graph_builder.build_graph(model, input_shape=shape)

  def predict(graph):
    return ghn_lib.predict_params(ghn, variables, graph)

  _fresh_compile_caches()
  graph_builder.clear_cache()
  first_with_graph, _ = _timed(lambda: predict(build()))
  graph = build()
  _fresh_compile_caches()
  first, _ = _timed(lambda: predict(graph))
  first_disk_cache = _first_call_with_disk_cache(lambda: predict(graph))
  steady = _median(lambda: predict(graph))
  steady_with_graph = _median(lambda: predict(build()))
  return [
    (
      "ResNet-50: graph + prediction, first call (compile)",
      first_with_graph,
      "s",
      BASELINE_RESNET50_S,
    ),
    (
      "ResNet-50: prediction from a graph, first call (compile)",
      first,
      "s",
      BASELINE_RESNET50_PREBUILT_S,
    ),
    (
      "ResNet-50: prediction from a graph, first call (disk cache)",
      first_disk_cache,
      "s",
      BASELINE_RESNET50_PREBUILT_S,
    ),
    (
      "ResNet-50: prediction from a graph, steady state",
      steady,
      "s",
      BASELINE_RESNET50_NO_GRAD_S,
    ),
    (
      "ResNet-50: graph (cached) + prediction, steady state",
      steady_with_graph,
      "s",
      BASELINE_RESNET50_S,
    ),
  ]


def _reference_rows(ghn, variables) -> list[tuple]:
  paths = sorted(
    p for p in REFERENCE_DIR.glob("*.npz") if p.stem != "ghn_state_dict"
  )
  rows = []
  for path in paths:
    spec = ghn_inputs.spec_from_reference(np.load(path))
    _fresh_compile_caches()
    first, _ = _timed(lambda s=spec: ghn_lib.predict_params(ghn, variables, s))
    steady = _median(lambda s=spec: ghn_lib.predict_params(ghn, variables, s))
    name = f"{path.stem} ({spec.num_nodes} nodes)"
    rows.append((f"{name}: first call (compile)", first, "s", None))
    rows.append((f"{name}: steady state", steady, "s", BASELINE_ONE_NETWORK_S))
  return rows


def _meta_batch_rows(ghn, variables) -> list[tuple]:
  rng = sampler.split_rng("train", 0)
  archs = sampler.sample_architectures("train", META_BATCH, rng)
  graphs = [graph_deepnets.build_deepnets_graph(a.config) for a in archs]
  num_nodes = sum(g.num_nodes for g in graphs)

  def forward():
    inputs, plans = ghn_lib.prepare_inputs(ghn.config, graphs)
    outputs = jax.device_get(ghn_lib.apply_jit(ghn, variables, inputs))
    return [ghn_lib.assemble_params(outputs, p, np) for p in plans]

  inputs, _ = ghn_lib.prepare_inputs(ghn.config, graphs)

  @jax.jit
  def forward_backward(variables, inputs):
    outputs, vjp = jax.vjp(lambda v: ghn.apply(v, inputs), variables)
    cotangent = jax.tree_util.tree_map(jax.numpy.ones_like, outputs)
    return vjp(cotangent)

  first, _ = _timed(forward)
  steady = _median(forward)
  first_backward, _ = _timed(lambda: forward_backward(variables, inputs))
  steady_backward = _median(lambda: forward_backward(variables, inputs))
  label = f"meta-batch of {META_BATCH} DeepNets-1M nets ({num_nodes} nodes)"
  return [
    (f"{label}: GHN forward, first call", first, "s", None),
    (
      f"{label}: GHN forward, steady state",
      steady,
      "s",
      BASELINE_META_BATCH_FORWARD_S,
    ),
    (f"{label}: GHN forward+backward, first call", first_backward, "s", None),
    (
      f"{label}: GHN forward+backward, steady state",
      steady_backward,
      "s",
      BASELINE_META_BATCH_FORWARD_S + BASELINE_META_BATCH_BACKWARD_S,
    ),
  ]


def run() -> list[tuple[str, float, str, float | None]]:
  """Measure GHN prediction speed; rows of (name, value, unit, baseline)."""
  ghn, variables = ghn_lib.init_ghn(ghn_lib.ghn2_config(), jax.random.key(0))
  variables = jax.block_until_ready(jax.device_put(variables))
  rows = _resnet_rows(ghn, variables)
  if REFERENCE_DIR.is_dir():
    rows += _reference_rows(ghn, variables)
  rows += _meta_batch_rows(ghn, variables)
  return rows


if __name__ == "__main__":
  for name, value, unit, baseline in run():
    reference = "-" if baseline is None else f"{baseline:.3g}"
    print(f"{name:70s} {value:9.4f} {unit:3s} original: {reference}")
