"""Generate a split of DeepNets-1M architectures on disk.

Example:

  python experiments/generate_nets.py --split train --num 1000 --seed 0 \\
    --out data/deepnets1m/train

Rerunning the same command after an interruption finishes the missing
shards only.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from ghn_jax.deepnets1m import dataset as dataset_lib
from ghn_jax.deepnets1m import sampler as sampler_lib

_SPLIT = flags.DEFINE_enum(
  "split", "train", sampler_lib.SPLITS, "Split to generate."
)
_NUM = flags.DEFINE_integer(
  "num", 1000, "Number of architectures.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_SHARD_SIZE = flags.DEFINE_integer(
  "shard_size",
  dataset_lib.DEFAULT_SHARD_SIZE,
  "Architectures per shard (part of the dataset's identity).",
  lower_bound=1,
)
_WORKERS = flags.DEFINE_integer(
  "workers",
  os.cpu_count() or 1,
  "Processes generating shards in parallel.",
  lower_bound=1,
)
_GRAPHS = flags.DEFINE_bool(
  "graphs", False, "Also build and store each network's GHN graph (slower)."
)


def main(argv: list[str]) -> int:
  del argv
  start = time.perf_counter()
  try:
    rejections = dataset_lib.generate_split(
      _OUT.value,
      _SPLIT.value,
      _NUM.value,
      _SEED.value,
      shard_size=_SHARD_SIZE.value,
      num_workers=_WORKERS.value,
      graph_fn=dataset_lib.build_network_graph if _GRAPHS.value else None,
    )
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  print(
    f"{_NUM.value} {_SPLIT.value} architectures in {_OUT.value} "
    f"({seconds:.1f} s); rejected candidates: {rejections}"
  )
  return 0


if __name__ == "__main__":
  app.run(main)
