"""Meta-train a GHN on DeepNets-1M architectures.

Usage:
  python experiments/meta_train.py --config=ghn_jax/configs/cpu_default.py \
    --workdir=workdir/cpu_default

Config fields can be overridden on the command line, e.g.
`--config.num_train_steps=100`. A run resumes from the latest checkpoint in
its workdir.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ghn_jax.train import train_and_evaluate

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(__file__), "..", "ghn_jax", "configs", "cpu_default.py"
)
_CONFIG = config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Meta-training config file."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "workdir/cpu_default", "Run directory (checkpoints, metrics)."
)
_COMPILATION_CACHE = flags.DEFINE_bool(
  "compilation_cache",
  True,
  "Keep compiled programs in <workdir>/jax_cache, so that a resumed or "
  "repeated run skips most compilations.",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first (multi-host runs).",
)


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if _COMPILATION_CACHE.value:
    cache_dir = os.path.abspath(os.path.join(_WORKDIR.value, "jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("JAX devices: %s", jax.devices())
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
