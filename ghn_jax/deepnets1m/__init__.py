"""DeepNets-1M: the architecture space GHN-2 is trained and evaluated on."""

from ghn_jax.deepnets1m.config import NetConfig, config_from_net_args
from ghn_jax.deepnets1m.genotypes import DARTS, PDARTS, VIT, Genotype
from ghn_jax.deepnets1m.net import Network
from ghn_jax.deepnets1m.plan import count_params, param_specs

__all__ = [
  "DARTS",
  "PDARTS",
  "VIT",
  "Genotype",
  "NetConfig",
  "Network",
  "config_from_net_args",
  "count_params",
  "param_specs",
]
