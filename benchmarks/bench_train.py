"""Speed of meta-training: one GHN-2 iteration and architectures per second.

Measures, with the GHN-2 CIFAR-10 configuration (hidden size 32, virtual
edges, layer norm, weight normalisation) on DeepNets-1M training
architectures at the original's training widths, image batch 64 of 32x32
random images:

- one meta-training iteration at meta-batch 8, once its op signatures are
  compiled (the same 8 networks again), against the original's 35.7 s;
- steady-state architectures per second over a stream of distinct
  architectures (compilations included), after a warm-up, against the
  original's 8 / 35.7 s (meta-batch 8) = 0.224 architectures per second.

The stream runs twice, each time in a fresh process: with an empty
persistent compilation cache, then with the cache the first pass filled
(a resumed or repeated run). The number of distinct architectures is
`GHN_BENCH_TRAIN_ARCHS` (default 200; 0 skips the stream), after
`GHN_BENCH_TRAIN_WARMUP` warm-up meta-batches (default 2). On a 2-core CPU
the two passes over 200 architectures took about 18 minutes.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ghn_jax.configs import ghn2_cifar10
from ghn_jax.train import (
  arch_stream,
  compile_count,
  executor,
  loop,
  padding,
)

META_BATCH = 8
IMAGE_BATCH = 64
IMAGE_SIZE = 32
NUM_CLASSES = 10
REPEATS = 3
# The original's figures on the same machine (ppuda, PyTorch, 2 threads):
# one iteration at meta-batch 8, and the median meta-batch-1 iteration.
ORIGINAL_ITERATION_SECONDS = 35.7
ORIGINAL_ARCHS_PER_SECOND = META_BATCH / ORIGINAL_ITERATION_SECONDS
ORIGINAL_MB1_ITERATION_SECONDS = 3.18
# The original's split of its meta-batch-8 iteration (medians, seconds).
ORIGINAL_PHASE_SECONDS = {
  "GHN forward": 4.49,
  "networks forward + backward": 9.80 + 14.68,
  "GHN backward": 4.25,
}


def _step(state, update_fn, ghn_config, batch, images, labels):
  loss, _, grads = executor.meta_value_and_grad(
    ghn_config, state.params, batch, images, labels
  )
  state = update_fn(state, grads)
  jax.block_until_ready(state.params)
  return state, float(loss)


def _phase_times(state, ghn_config, batch, images, labels) -> dict[str, float]:
  """Time the phases of one step: GHN forward, networks, GHN backward."""
  forward_fn, backward_fn = executor.ghn_functions(ghn_config)
  times = {}
  start = time.perf_counter()
  outputs = jax.block_until_ready(forward_fn(state.params, batch.inputs))
  times["GHN forward"] = time.perf_counter() - start

  start = time.perf_counter()
  params_list = [
    executor.assemble_network_params(outputs, p) for p in batch.plans
  ]

  def loss_fn(params_list):
    return executor.networks_loss(params_list, batch.networks, images, labels)

  (_, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params_list)
  cotangent = jax.block_until_ready(
    executor.outputs_cotangent(outputs, batch.plans, grads)
  )
  times["networks forward + backward"] = time.perf_counter() - start

  start = time.perf_counter()
  jax.block_until_ready(backward_fn(state.params, batch.inputs, cotangent))
  times["GHN backward"] = time.perf_counter() - start
  return times


def _setup(seed: int = 0):
  """GHN state, update function, image batch and architecture stream."""
  config = ghn2_cifar10.get_config()
  ghn_config = loop.make_ghn_config(config, NUM_CLASSES)
  optimizer, _ = loop.make_optimizer(config, total_steps=1000)
  state = loop.create_train_state(ghn_config, optimizer, seed=seed)
  update_fn = loop.make_update_fn(optimizer)
  rng = np.random.default_rng(seed)
  images = jnp.asarray(
    rng.standard_normal((IMAGE_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  )
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, IMAGE_BATCH), jnp.int32)
  space = arch_stream.ArchitectureSpace(num_classes=NUM_CLASSES)
  stream = arch_stream.ArchitectureStream(space, META_BATCH)
  return ghn_config, state, update_fn, images, labels, stream


def measure_stream(num_archs: int, warmup: int) -> dict[str, float]:
  """Train on a stream of distinct architectures; return its throughput.

  After `warmup` meta-batches, times meta-batches until `num_archs`
  architectures have been seen, compilations included.
  """
  compile_count.install()
  ghn_config, state, update_fn, images, labels, stream = _setup()
  padder = padding.GrowingPadder()
  for _ in range(warmup):
    ids, configs = next(stream)
    batch = executor.prepare_meta_batch(ghn_config, configs, ids, padder)
    state, _ = _step(state, update_fn, ghn_config, batch, images, labels)
  compiles_before = compile_count.compile_count()
  start = time.perf_counter()
  seen = 0
  while seen < num_archs:
    ids, configs = next(stream)
    batch = executor.prepare_meta_batch(ghn_config, configs, ids, padder)
    state, _ = _step(state, update_fn, ghn_config, batch, images, labels)
    compile_count.release_programs_near_map_limit()
    seen += META_BATCH
  elapsed = time.perf_counter() - start
  return {
    "archs": seen,
    "archs_per_sec": seen / elapsed,
    "compiles": compile_count.compile_count() - compiles_before,
  }


def _stream_in_subprocess(
  num_archs: int, warmup: int, cache_dir: str
) -> dict[str, float]:
  """Run `measure_stream` in a fresh process with a persistent cache."""
  command = [
    sys.executable,
    __file__,
    "--stream",
    str(num_archs),
    str(warmup),
    cache_dir,
  ]
  root = pathlib.Path(__file__).resolve().parent.parent
  done = subprocess.run(
    command, cwd=root, check=True, capture_output=True, text=True
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


def run() -> list[tuple[str, float, str, float | None]]:
  """Return the benchmark rows (name, value, unit, baseline)."""
  compile_count.install()
  num_archs = int(os.environ.get("GHN_BENCH_TRAIN_ARCHS", "200"))
  warmup = int(os.environ.get("GHN_BENCH_TRAIN_WARMUP", "2"))
  ghn_config, state, update_fn, images, labels, stream = _setup()
  padder = padding.GrowingPadder()

  # One iteration with its signatures compiled.
  ids, configs = next(stream)
  batch = executor.prepare_meta_batch(ghn_config, configs, ids, padder)
  state, _ = _step(state, update_fn, ghn_config, batch, images, labels)
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    batch = executor.prepare_meta_batch(ghn_config, configs, ids, padder)
    state, _ = _step(state, update_fn, ghn_config, batch, images, labels)
    times.append(time.perf_counter() - start)
  iteration = statistics.median(times)
  phases = _phase_times(state, ghn_config, batch, images, labels)
  rows = [
    (
      "meta-train iteration, meta-batch 8, batch 64 (compiled signatures)",
      iteration,
      "s",
      ORIGINAL_ITERATION_SECONDS,
    ),
    *[
      (f"  of which {name} (one run)", value, "s", ORIGINAL_PHASE_SECONDS[name])
      for name, value in phases.items()
    ],
  ]
  if num_archs <= 0:
    return rows

  # The same stream of distinct architectures runs twice, each time in a
  # fresh process. The first pass starts with an empty persistent
  # compilation cache, so every new op signature compiles. The second pass
  # reads the cache the first filled, as a resumed or repeated run does.
  with tempfile.TemporaryDirectory() as cache_dir:
    cold = _stream_in_subprocess(num_archs, warmup, cache_dir)
    warm = _stream_in_subprocess(num_archs, warmup, cache_dir)
  seen = int(cold["archs"])
  return rows + [
    (
      f"meta-train throughput over {seen} new architectures, compiling",
      cold["archs_per_sec"],
      "archs/s",
      ORIGINAL_ARCHS_PER_SECOND,
    ),
    (
      f"  compilations during those {seen} architectures",
      float(cold["compiles"]),
      "count",
      None,
    ),
    (
      f"meta-train throughput over the same {seen}, compilation cache filled",
      warm["archs_per_sec"],
      "archs/s",
      ORIGINAL_ARCHS_PER_SECOND,
    ),
  ]


def _main(argv: list[str]) -> None:
  if argv[:1] == ["--stream"]:
    num_archs, warmup, cache_dir = int(argv[1]), int(argv[2]), argv[3]
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    print(json.dumps(measure_stream(num_archs, warmup)))
    return
  for row in run():
    print(row)


if __name__ == "__main__":
  _main(sys.argv[1:])
