"""GHN-2 forward pass against test vectors of the original implementation.

The folder named by `GHN_REFERENCE_DIR` (default: `../shared/ghn2_reference`
next to the repository) contains test vectors of the original GHN-2. Its
`ghn_state_dict.npz` is the state dict of a randomly initialised GHN with the
CIFAR-10 configuration. Each `<arch>.npz` has the graph arrays, the
intermediate node embeddings and every parameter tensor the original
predicted for one architecture. Every `<arch>.npz` found there is checked.
"""

from __future__ import annotations

import os
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from ghn_jax import checkpoint_import, ghn_inputs
from ghn_jax import ghn as ghn_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = pathlib.Path(
  os.environ.get(
    "GHN_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "ghn2_reference"
  )
)
STATE_DICT = REFERENCE_DIR / "ghn_state_dict.npz"
CHECKPOINT = REFERENCE_DIR / "ghn_random.pt"
EMBEDDING_ATOL = 1e-5
PARAM_RTOL = 1e-4
# Architectures also run without jax.jit (op by op) when this small.
MAX_NODES_WITHOUT_JIT = 64


def _architectures() -> list[str]:
  if not REFERENCE_DIR.is_dir():
    return []
  return sorted(
    p.stem for p in REFERENCE_DIR.glob("*.npz") if p.name != STATE_DICT.name
  )


ARCHITECTURES = _architectures()
requires_reference = pytest.mark.skipif(
  not STATE_DICT.is_file() or not ARCHITECTURES,
  reason=(
    f"no GHN reference vectors in {REFERENCE_DIR} (set GHN_REFERENCE_DIR to "
    "a folder with ghn_state_dict.npz and <arch>.npz files)"
  ),
)


@pytest.fixture(scope="module")
def reference_ghn():
  state_dict = dict(np.load(STATE_DICT))
  config = ghn_lib.ghn2_config()
  variables = checkpoint_import.variables_from_state_dict(state_dict, config)
  return ghn_lib.GHN(config), variables


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
  scale = max(float(np.linalg.norm(expected)), 1e-12)
  return float(np.linalg.norm(got - expected)) / scale


def check_against_reference(outputs: dict, plans, arrays) -> None:
  """Assert embeddings and every predicted tensor match the reference."""
  n = len(arrays["node_op_idx"])
  for key in ("x_shape_enc", "x_gnn", "x_final"):
    np.testing.assert_allclose(
      np.asarray(outputs[key])[:n],
      arrays[key],
      rtol=0,
      atol=EMBEDDING_ATOL,
      err_msg=key,
    )
  outputs = jax.device_get(outputs)
  predicted = {
    plan.path: ghn_inputs.assemble_tensor(outputs, plan, np) for plan in plans
  }
  expected = {
    k[len("param/") :]: arrays[k]
    for k in arrays.files
    if k.startswith("param/")
  }
  assert sorted(predicted) == sorted(expected)
  for name, value in expected.items():
    assert predicted[name].shape == value.shape, name
    error = _relative_error(predicted[name], value)
    assert error <= PARAM_RTOL, f"{name}: relative L2 error {error:.2e}"


@requires_reference
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reference_jit(reference_ghn, arch):
  ghn, variables = reference_ghn
  arrays = np.load(REFERENCE_DIR / f"{arch}.npz")
  spec = ghn_inputs.spec_from_reference(arrays)
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  np.testing.assert_array_equal(
    inputs["shape_index"][: spec.num_nodes], arrays["node_shape_ind"]
  )
  outputs = ghn_lib.apply_jit(ghn, variables, inputs)
  check_against_reference(outputs, plans[0], arrays)


@requires_reference
def test_reference_without_jit(reference_ghn):
  ghn, variables = reference_ghn
  sizes = {
    arch: len(np.load(REFERENCE_DIR / f"{arch}.npz")["node_op_idx"])
    for arch in ARCHITECTURES
  }
  arch = min(sizes, key=sizes.get)
  if sizes[arch] > MAX_NODES_WITHOUT_JIT:
    pytest.skip(f"smallest reference graph has {sizes[arch]} nodes")
  arrays = np.load(REFERENCE_DIR / f"{arch}.npz")
  spec = ghn_inputs.spec_from_reference(arrays)
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  outputs = ghn.apply(variables, inputs)
  check_against_reference(outputs, plans[0], arrays)


@requires_reference
def test_reference_meta_batch(reference_ghn):
  """All reference graphs in one padded batch give the same predictions."""
  ghn, variables = reference_ghn
  arrays = [np.load(REFERENCE_DIR / f"{a}.npz") for a in ARCHITECTURES]
  specs = [ghn_inputs.spec_from_reference(a) for a in arrays]
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, specs)
  outputs = jax.device_get(ghn_lib.apply_jit(ghn, variables, inputs))
  offset = 0
  for spec, plan, arr in zip(specs, plans, arrays, strict=True):
    n = spec.num_nodes
    sliced = {
      k: outputs[k][offset : offset + n]
      for k in ("x_shape_enc", "x_gnn", "x_final")
    }
    check_against_reference({**outputs, **sliced}, plan, arr)
    offset += n


@requires_reference
@pytest.mark.skipif(
  not CHECKPOINT.is_file(), reason=f"no {CHECKPOINT.name} in {REFERENCE_DIR}"
)
def test_reference_from_torch_checkpoint(tmp_path):
  """A converted .pt checkpoint reproduces the reference predictions."""
  out = tmp_path / "ghn.npz"
  checkpoint_import.convert_checkpoint(str(CHECKPOINT), str(out))
  ghn, variables = ghn_lib.load_ghn(str(out))
  arch = ARCHITECTURES[0]
  arrays = np.load(REFERENCE_DIR / f"{arch}.npz")
  spec = ghn_inputs.spec_from_reference(arrays)
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  outputs = ghn_lib.apply_jit(ghn, variables, inputs)
  check_against_reference(outputs, plans[0], arrays)


def _flax_path(torch_name: str, ndim: int) -> str:
  """Flax params path of a torchvision ResNet parameter in `ghn_jax.zoo`."""
  name = re.sub(r"layer(\d)\.(\d)\.", r"layer\1_\2/", torch_name)
  name = name.replace("downsample.0", "downsample_conv")
  name = name.replace("downsample.1", "downsample_bn")
  module, kind = name.rsplit(".", 1)
  if kind == "weight":
    kind = "scale" if ndim == 1 else "kernel"
  return f"{module.replace('.', '/')}/{kind}"


@requires_reference
@pytest.mark.skipif(
  "resnet18" not in ARCHITECTURES, reason="no resnet18.npz reference"
)
def test_reference_resnet18_from_flax_model(reference_ghn):
  """The graph built from the Flax ResNet-18 gives the original's values."""
  from ghn_jax import graph_builder, zoo

  ghn, variables = reference_ghn
  model, input_shape = zoo.create_model("resnet18")
  graph = graph_builder.build_graph(model, input_shape=input_shape)
  params = traverse_util.flatten_dict(
    ghn_lib.predict_params(ghn, variables, graph), sep="/"
  )
  arrays = np.load(REFERENCE_DIR / "resnet18.npz")
  expected = {
    k[len("param/") :]: arrays[k]
    for k in arrays.files
    if k.startswith("param/")
  }
  assert len(params) == len(expected)
  for torch_name, value in expected.items():
    got = np.asarray(params[_flax_path(torch_name, value.ndim)])
    if value.ndim == 4:
      got = got.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      got = got.T
    error = _relative_error(got, value)
    assert error <= PARAM_RTOL, f"{torch_name}: relative L2 error {error:.2e}"
