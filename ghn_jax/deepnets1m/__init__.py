"""DeepNets-1M: the architecture space GHN-2 is trained and evaluated on.

Names are imported on first use, so the sampler and dataset modules (used by
worker processes that generate architectures) load without JAX and Flax.
"""

import importlib

_EXPORTS = {
  "DARTS": "genotypes",
  "PDARTS": "genotypes",
  "VIT": "genotypes",
  "Genotype": "genotypes",
  "NetConfig": "config",
  "config_from_net_args": "config",
  "Network": "net",
  "abstract_params": "net",
  "count_params": "plan",
  "param_specs": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
  return getattr(module, name)
