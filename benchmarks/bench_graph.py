"""Speed of building GHN graphs (with virtual edges), against the original.

Baselines are the original's (ppuda, torch 2.14, 2 CPU cores, idle
machine): `Graph(model, ve_cutoff=50)` takes a median 0.14 s per
DeepNets-1M network at C=32 (first 100 generated training networks),
0.31 s for those above 300 nodes, and 0.21 s for ResNet-50.

Rows (name, value, unit, baseline), all medians over repeated runs:
  - DeepNets-1M graph + virtual edges, direct builder (100 sampled training
    networks, seed 0, C=32; fastest of 3 runs per network), overall and for
    networks above 300 nodes;
  - the same by tracing the Flax network with `jax.make_jaxpr` (10 networks);
  - ResNet-50 graph + virtual edges: first build (traced, 7 runs after a
    warm-up), first build in a new process without and with a filled
    on-disk cache (5 processes each, the build call timed inside each,
    imports excluded), and rebuild (in-memory cache);
  - padding and batching 8 graphs into a jraph GraphsTuple.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ghn_jax import graph as graph_lib
from ghn_jax import graph_builder, graph_deepnets, jraph_utils, zoo
from ghn_jax.deepnets1m import net, sampler

NUM_NETWORKS = 100
NUM_TRACED = 10
REPEATS_PER_NETWORK = 3
LARGE_GRAPH_NODES = 300
RESNET_REPEATS = 7
NEW_PROCESSES = 5
CACHED_REPEATS = 50
BATCH_SIZE = 8
# The original's figures (seconds) on the same 2-core machine.
BASELINE_DEEPNETS_S = 0.14
BASELINE_DEEPNETS_LARGE_S = 0.31
BASELINE_RESNET50_S = 0.21
MS = 1e3


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _with_virtual_edges(graph: graph_lib.Graph) -> graph_lib.Graph:
  graph_lib.virtual_edges(graph.senders, graph.receivers, graph.num_nodes)
  return graph


def _configs():
  rng = sampler.split_rng("train", 0)
  return [
    a.config for a in sampler.sample_architectures("train", NUM_NETWORKS, rng)
  ]


def _deepnets_rows(configs):
  times, sizes, graphs = [], [], []
  for config in configs:
    # The fastest of a few runs per network filters out interference from
    # other processes; the median is then taken over networks.
    runs = [
      _timed(
        lambda c=config: _with_virtual_edges(
          graph_deepnets.build_deepnets_graph(c)
        )
      )
      for _ in range(REPEATS_PER_NETWORK)
    ]
    seconds, graph = min(runs, key=lambda run: run[0])
    times.append(seconds)
    sizes.append(graph.num_nodes)
    graphs.append(graph)
  large = [
    t for t, n in zip(times, sizes, strict=True) if n > LARGE_GRAPH_NODES
  ]
  rows = [
    (
      "DeepNets-1M graph + virtual edges, direct (median)",
      statistics.median(times) * MS,
      "ms",
      BASELINE_DEEPNETS_S * MS,
    ),
  ]
  if large:
    rows.append(
      (
        f"DeepNets-1M graph + virtual edges, direct, >{LARGE_GRAPH_NODES} "
        f"nodes ({len(large)} nets)",
        statistics.median(large) * MS,
        "ms",
        BASELINE_DEEPNETS_LARGE_S * MS,
      )
    )
  rows.append(
    (
      "DeepNets-1M graph nodes (median)",
      statistics.median(sizes),
      "nodes",
      None,
    )
  )
  return rows, graphs


def _traced_rows(configs):
  times = []
  for config in configs[:NUM_TRACED]:
    model = net.Network(config)
    shape = (1, config.input_size, config.input_size, 3)
    seconds, _ = _timed(
      lambda m=model, s=shape: _with_virtual_edges(
        graph_builder.build_graph(m, input_shape=s, trace=True, cache=False)
      )
    )
    times.append(seconds)
  return [
    (
      f"DeepNets-1M graph + virtual edges, traced ({NUM_TRACED} nets)",
      statistics.median(times) * MS,
      "ms",
      BASELINE_DEEPNETS_S * MS,
    )
  ]


# Run in a fresh process: one ResNet-50 build, timed after the imports and
# printed in seconds. The argument is the on-disk cache folder, or empty for
# none (then JAX's in-process caches of traced functions are cold too).
_NEW_PROCESS_SCRIPT = """
import sys, time
from ghn_jax import graph as graph_lib, graph_builder, zoo
model, shape = zoo.create_model("resnet50")
start = time.perf_counter()
graph = graph_builder.build_graph(
  model, input_shape=shape, cache_dir=sys.argv[1] or None
)
graph_lib.virtual_edges(graph.senders, graph.receivers, graph.num_nodes)
print(time.perf_counter() - start)
"""


def _new_process_seconds(cache_dir: str) -> list[float]:
  """Time ResNet-50 builds in new processes, each after its imports."""
  env = dict(os.environ)
  env.pop(graph_builder.GRAPH_CACHE_DIR_ENV, None)
  return [
    float(
      subprocess.run(
        [sys.executable, "-c", _NEW_PROCESS_SCRIPT, cache_dir],
        capture_output=True,
        text=True,
        check=True,
        env=env,
      ).stdout.split()[-1]
    )
    for _ in range(NEW_PROCESSES)
  ]


def _disk_cache_seconds() -> list[float]:
  """Time ResNet-50 builds in new processes that find the graph on disk."""
  with tempfile.TemporaryDirectory() as cache_dir:
    model, shape = zoo.create_model("resnet50")
    graph_builder.build_graph(model, input_shape=shape, cache_dir=cache_dir)
    return _new_process_seconds(cache_dir)


def _resnet_rows():
  model, shape = zoo.create_model("resnet50")

  def build():
    return _with_virtual_edges(
      graph_builder.build_graph(model, input_shape=shape)
    )

  # A warm-up build fills JAX's caches of traced helper functions (random
  # numbers per parameter shape, activations), as in a process that built
  # graphs before; a cold process is measured by `_new_process_seconds`.
  graph_builder.clear_cache()
  build()
  first = []
  for _ in range(RESNET_REPEATS):
    graph_builder.clear_cache()
    first.append(_timed(build)[0])
  cached = [_timed(build)[0] for _ in range(CACHED_REPEATS)]
  graph_builder.clear_cache()
  from_disk = _disk_cache_seconds()
  cold = _new_process_seconds("")
  return [
    (
      "ResNet-50 graph + virtual edges, first build (traced)",
      statistics.median(first) * MS,
      "ms",
      BASELINE_RESNET50_S * MS,
    ),
    (
      "ResNet-50 graph + virtual edges, new process, no disk cache",
      statistics.median(cold) * MS,
      "ms",
      BASELINE_RESNET50_S * MS,
    ),
    (
      "ResNet-50 graph + virtual edges, new process, on-disk cache",
      statistics.median(from_disk) * MS,
      "ms",
      BASELINE_RESNET50_S * MS,
    ),
    (
      "ResNet-50 graph + virtual edges, rebuild (cached trace)",
      statistics.median(cached) * MS,
      "ms",
      BASELINE_RESNET50_S * MS,
    ),
  ]


def _batch_rows(graphs):
  batches = [
    graphs[i : i + BATCH_SIZE] for i in range(0, len(graphs), BATCH_SIZE)
  ]
  times = [
    _timed(lambda b=batch: jraph_utils.graphs_to_padded_batch(b))[0]
    for batch in batches
    if len(batch) == BATCH_SIZE
  ]
  return [
    (
      f"{BATCH_SIZE} graphs -> padded GraphsTuple (with virtual edges)",
      statistics.median(times) * MS,
      "ms",
      None,
    )
  ]


def run() -> list[tuple[str, float, str, float | None]]:
  """Measure graph building; return (name, value, unit, baseline) rows."""
  configs = _configs()
  rows, graphs = _deepnets_rows(configs)
  rows += _traced_rows(configs)
  rows += _resnet_rows()
  rows += _batch_rows(graphs)
  return rows


if __name__ == "__main__":
  for name, value, unit, baseline in run():
    base = "-" if baseline is None else f"{baseline:.1f}"
    speedup = "" if baseline is None else f"  ({baseline / value:.0f}x)"
    print(f"{name:70s} {value:10.2f} {unit:5s} baseline {base}{speedup}")
  print(f"(numpy {np.__version__})")
