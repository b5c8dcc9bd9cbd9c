"""Compare the Flax DeepNets-1M networks with outputs of the original.

Each case of the reference folder (env var `GHN_REFERENCE_DIR`, default
`../shared/ghn2_reference` next to the repository) contains the original's
`net_args`, parameter shapes and counts (`<case>.json`), and parameters,
an input batch and the logits (`<case>.npz`). Cases that are not a
DeepNets-1M `Network` (e.g. torchvision models) are skipped.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ghn_jax.deepnets1m import plan as plan_lib
from ghn_jax.deepnets1m.config import config_from_net_args
from ghn_jax.deepnets1m.net import Network

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = pathlib.Path(
  os.environ.get(
    "GHN_REFERENCE_DIR", _REPO_ROOT.parent / "shared" / "ghn2_reference"
  )
)
# Relative tolerance on the logits: batch norm over a batch of 4 amplifies
# float32 rounding differences.
LOGITS_RTOL = 1e-4
_PRUNED_KEY = (
  "pruned_param_names (set to None by GHN: modules not in the graph)"
)


def _case_names() -> list[str]:
  if not REFERENCE_DIR.is_dir():
    return []
  return sorted(
    p.stem
    for p in REFERENCE_DIR.glob("*.json")
    if (REFERENCE_DIR / f"{p.stem}.npz").exists()
  )


CASES = _case_names()


def _load_case(name: str):
  meta = json.loads((REFERENCE_DIR / f"{name}.json").read_text())
  if not meta.get("net_args"):
    pytest.skip(
      f"{name}: source {meta.get('source', '')[:60]!r} is not a DeepNets-1M "
      "Network; the model zoo tests cover it."
    )
  return meta, np.load(REFERENCE_DIR / f"{name}.npz")


def _pruned(meta, npz) -> set[str]:
  if "pruned_param_names" in npz.files:
    return {str(n) for n in npz["pruned_param_names"]}
  return set(meta.get(_PRUNED_KEY, []))


pytestmark = pytest.mark.skipif(
  not CASES,
  reason=f"no reference cases in {REFERENCE_DIR} (set GHN_REFERENCE_DIR)",
)


@pytest.mark.parametrize("name", CASES)
def test_param_shapes_match_original(name):
  meta, npz = _load_case(name)
  config = config_from_net_args(meta["net_args"])
  mapping = plan_lib.torch_name_mapping(config)
  pruned = _pruned(meta, npz)
  reference = meta["param_shapes"]

  # The reference lists the parameters left after the GHN removed pruned
  # ones; every original parameter is either listed or pruned.
  assert set(reference) - set(mapping) == set()
  assert set(mapping) - set(reference) == pruned
  for torch_name, shape in reference.items():
    assert mapping[torch_name].torch_shape == tuple(shape), torch_name
  for torch_name, spec in mapping.items():
    assert spec.live == (torch_name not in pruned), torch_name


@pytest.mark.parametrize("name", CASES)
def test_param_counts_match_original(name):
  meta, _ = _load_case(name)
  config = config_from_net_args(meta["net_args"])
  assert plan_lib.count_params(config) == meta["num_params"]
  before = meta.get("num_params_model_before_ghn", meta["num_params"])
  assert plan_lib.count_params(config, include_dead=True) == before


@pytest.mark.parametrize("name", CASES)
def test_flax_params_equal_live_specs(name):
  meta, npz = _load_case(name)
  config = config_from_net_args(meta["net_args"])
  x = jnp.zeros((1, config.input_size, config.input_size, 3))
  shapes = jax.eval_shape(Network(config).init, jax.random.key(0), x)
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  expected = {s.path: s.shape for s in plan_lib.param_specs(config) if s.live}
  assert {k: v.shape for k, v in flat.items()} == expected


def _params_from_npz(config, npz):
  params = {}
  for spec in plan_lib.param_specs(config):
    if spec.live:
      value = np.transpose(npz[f"param/{spec.torch_name}"], spec.perm)
      params[spec.path] = jnp.asarray(value)
  return traverse_util.unflatten_dict(params, sep="/")


@pytest.mark.parametrize("name", CASES)
def test_logits_match_original(name):
  meta, npz = _load_case(name)
  config = config_from_net_args(meta["net_args"])
  params = _params_from_npz(config, npz)
  images = jnp.asarray(np.transpose(npz["input_x"], (0, 2, 3, 1)))

  # Full float32 matmuls, so GPUs that default to TF32 meet the tolerance.
  with jax.default_matmul_precision("highest"):
    logits = Network(config).apply({"params": params}, images)

  expected = npz["logits"]
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(
    np.asarray(logits), expected, rtol=0, atol=LOGITS_RTOL * scale
  )
