"""Meta-train a GHN on DeepNets-1M architectures.

Usage:
  python experiments/meta_train.py --config=ghn_jax/configs/cpu_default.py \
    --workdir=workdir/cpu_default

Config fields can be overridden on the command line, e.g.
`--config.num_train_steps=100`; `--print_config` lists the fields and
exits. A run resumes from the latest checkpoint in its workdir.
"""

import importlib.util
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ghn_jax.train import checkpoint, train_and_evaluate

_CONFIG_DIR = os.path.normpath(
  os.path.join(os.path.dirname(__file__), "..", "ghn_jax", "configs")
)
_DEFAULT_CONFIG = os.path.join(_CONFIG_DIR, "cpu_default.py")
_CONFIG_FLAG = "--config"


def _config_choices() -> str:
  names = sorted(
    name
    for name in os.listdir(_CONFIG_DIR)
    if name.endswith(".py") and not name.startswith("_")
  )
  directory = os.path.relpath(_CONFIG_DIR)
  return ", ".join(os.path.join(directory, name) for name in names)


def _parse_config_args(argv: list[str]) -> tuple[str, list[str]]:
  """Return the `--config` file and the `--config.FIELD` names in `argv`."""
  path, fields = _DEFAULT_CONFIG, []
  for index, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg == _CONFIG_FLAG and index + 1 < len(argv):
      path = argv[index + 1]
    elif arg.startswith(_CONFIG_FLAG + "="):
      path = arg.split("=", 1)[1]
    elif arg.startswith(_CONFIG_FLAG + "."):
      fields.append(arg[len(_CONFIG_FLAG) + 1 :].split("=", 1)[0])
  return path, fields


def _load_config(path: str) -> ml_collections.ConfigDict:
  """Call `get_config()` of a config file (`file.py` or `file.py:arg`)."""
  filename, _, argument = path.partition(":")
  spec = importlib.util.spec_from_file_location("_checked_config", filename)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def check_config_args(argv: list[str]) -> str | None:
  """Check the config file and the overridden fields named in `argv`.

  `config_flags` reports both mistakes as chained tracebacks, and an
  unknown field already at flag definition, so they are checked first.

  Returns:
    A one-line error message, or None if the config file loads and every
    overridden field exists in it.
  """
  path, fields = _parse_config_args(argv)
  filename = path.partition(":")[0]
  if not os.path.isfile(filename):
    return (
      f"Config file {filename!r} not found: pass --config with one of "
      f"{_config_choices()}, or another file defining get_config()."
    )
  config = _load_config(path)
  for field in fields:
    node = config
    for key in field.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        return (
          f"Config field {field!r} does not exist in {filename}: list the "
          "fields with --print_config."
        )
      node = node[key]
  return None


if __name__ == "__main__":
  _ERROR = check_config_args(sys.argv)
  if _ERROR:
    sys.exit(f"meta_train.py: error: {_ERROR}")

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
_PRINT_CONFIG = flags.DEFINE_bool(
  "print_config",
  False,
  "Print the config (with overrides) and exit without training.",
)


def main(argv):
  del argv
  if _PRINT_CONFIG.value:
    print(_CONFIG.value)
    return
  checkpoint.quiet_library_logging()
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
