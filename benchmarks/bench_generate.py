"""Speed of generating DeepNets-1M architectures, against the original.

Baselines are the original's (ppuda `experiments/net_generator.py`, torch
2.14, 2 CPU cores): 865 s for 1000 training architectures, i.e. 0.86 s per
accepted architecture (it builds each network twice and traces its graph),
and a median 73 ms to construct a network at training width
(`Network(light=True)`), which the GHN training loader does per use.

Rows (name, value, unit, baseline), medians over repeated runs:
  - architectures sampled per second in one process (genotype, settings,
    rejection tests, parameter counts at CIFAR and ImageNet size);
  - seconds to write a 1000-architecture train split with one worker and
    with two worker processes (shards in parallel);
  - one meta-batch of 8 training configurations (widths re-drawn) and the
    same with GHN graphs built for each network;
  - abstract parameter shapes of one Flax network (`jax.eval_shape`).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ghn_jax.deepnets1m import dataset as dataset_lib
from ghn_jax.deepnets1m import net as net_lib
from ghn_jax.deepnets1m import sampler

NUM_SAMPLED = 500
NUM_SPLIT = 1000
REPEATS = 3
META_BATCH = 8
NUM_META_BATCHES = 50
NUM_EVAL_SHAPE = 20
# The original's figures on the same 2-core machine.
BASELINE_SPLIT_S = 864.9
BASELINE_ARCH_S = 0.865
BASELINE_NETWORK_S = 0.0726
MS = 1e3


def _sampling_rate() -> float:
  rates = []
  for repeat in range(REPEATS):
    rng = sampler.split_rng("train", 100 + repeat)
    start = time.perf_counter()
    for _ in sampler.sample_architectures("train", NUM_SAMPLED, rng):
      pass
    rates.append(NUM_SAMPLED / (time.perf_counter() - start))
  return statistics.median(rates)


def _split_seconds(num_workers: int) -> float:
  times = []
  for repeat in range(REPEATS):
    with tempfile.TemporaryDirectory() as directory:
      start = time.perf_counter()
      dataset_lib.generate_split(
        directory,
        "train",
        NUM_SPLIT,
        seed=1000 * num_workers + repeat,
        num_workers=num_workers,
        progress=False,
      )
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def _meta_batch_ms(with_graphs: bool) -> float:
  with tempfile.TemporaryDirectory() as directory:
    dataset_lib.generate_split(
      directory, "train", NUM_SPLIT, shard_size=NUM_SPLIT, progress=False
    )
    data = dataset_lib.ArchitectureDataset(directory)
    batches = dataset_lib.meta_batches(
      data, META_BATCH, np.random.default_rng(0)
    )
    times = []
    for _ in range(NUM_META_BATCHES):
      start = time.perf_counter()
      batch = next(batches)
      if with_graphs:
        for _, config in batch:
          dataset_lib.build_network_graph(config)
      times.append(time.perf_counter() - start)
  return statistics.median(times) * MS


def _eval_shape_ms() -> float:
  rng = sampler.split_rng("train", 0)
  times = []
  for arch in sampler.sample_architectures("train", NUM_EVAL_SHAPE, rng):
    model = net_lib.Network(arch.config)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    start = time.perf_counter()
    jax.eval_shape(model.init, jax.random.key(0), x)
    times.append(time.perf_counter() - start)
  return statistics.median(times) * MS


def run() -> list[tuple[str, float, str, float | None]]:
  """Measure generation and loading speed; return the benchmark rows."""
  rate = _sampling_rate()
  return [
    (
      "DeepNets-1M sampling, 1 process",
      rate,
      "arch/s",
      1 / BASELINE_ARCH_S,
    ),
    (
      "DeepNets-1M 1000-arch train split to disk, 1 worker",
      _split_seconds(1),
      "s",
      BASELINE_SPLIT_S,
    ),
    (
      "DeepNets-1M 1000-arch train split to disk, 2 workers",
      _split_seconds(2),
      "s",
      BASELINE_SPLIT_S,
    ),
    (
      f"DeepNets-1M meta-batch of {META_BATCH} configs (widths re-drawn)",
      _meta_batch_ms(with_graphs=False),
      "ms",
      None,
    ),
    (
      f"DeepNets-1M meta-batch of {META_BATCH} configs + GHN graphs",
      _meta_batch_ms(with_graphs=True),
      "ms",
      None,
    ),
    (
      "DeepNets-1M Flax network param shapes (eval_shape, median)",
      _eval_shape_ms(),
      "ms",
      BASELINE_NETWORK_S * MS,
    ),
  ]


if __name__ == "__main__":
  for row in run():
    print(row)
