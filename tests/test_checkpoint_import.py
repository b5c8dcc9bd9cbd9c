"""Import of original (PyTorch) GHN checkpoints without PyTorch."""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from ghn_jax import checkpoint_import
from ghn_jax import ghn as ghn_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = pathlib.Path(
  os.environ.get(
    "GHN_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "ghn2_reference"
  )
)


class _Tensor:
  """A tensor to write: a storage array plus offset, size and stride."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = size, stride


def _tensor(array: np.ndarray) -> _Tensor:
  array = np.ascontiguousarray(array)
  stride = tuple(s // array.itemsize for s in array.strides)
  return _Tensor(array.ravel(), 0, array.shape, stride)


def write_torch_checkpoint(path, obj, monkeypatch, prefix="archive/") -> None:
  """Write `obj` in torch.save's zip format (no torch needed).

  Fake `torch` modules make the pickler emit the same globals as torch:
  `torch._utils._rebuild_tensor_v2` and `torch.FloatStorage`.
  """
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  storage_classes = {}
  for name in ("FloatStorage", "LongStorage"):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
    storage_classes[name] = cls
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)

  storages: dict[int, tuple[str, np.ndarray]] = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, np.ndarray) and id(obj) in storages:
        key, array = storages[id(obj)]
        cls = storage_classes[
          "FloatStorage" if array.dtype == np.float32 else "LongStorage"
        ]
        return ("storage", cls, key, "cpu", array.size)
      return None

    def reducer_override(self, obj):
      if isinstance(obj, _Tensor):
        if id(obj.storage) not in storages:
          storages[id(obj.storage)] = (str(len(storages)), obj.storage)
        args = (
          obj.storage,
          obj.offset,
          tuple(obj.size),
          tuple(obj.stride),
          False,
          collections.OrderedDict(),
        )
        return (_rebuild_tensor_v2, args)
      return NotImplemented

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(prefix + "data.pkl", buffer.getvalue())
    for key, array in storages.values():
      archive.writestr(f"{prefix}data/{key}", array.tobytes())


def torch_state_dict(config, variables) -> dict:
  """Invert the key map: GHN variables -> PyTorch-named tensors."""
  flat = traverse_util.flatten_dict(
    jax.device_get(variables["params"]), sep="/"
  )
  state = {}
  for key, (path, convert) in checkpoint_import.key_map(config).items():
    value = np.asarray(flat[path])
    if convert is checkpoint_import._linear:
      value = value.T
      if key.startswith(("decoder.conv", "decoder.class_layer")):
        value = value[:, :, None, None]
    state[key] = value
  return state


TORCH_CONFIG_GHN1 = {
  "max_shape": (64, 64, 11, 11),
  "num_classes": 10,
  "hypernet": "gatedgnn",
  "decoder": "conv",
  "weight_norm": False,
  "ve": False,
  "layernorm": False,
  "hid": 32,
}


def test_tensors_with_strides_and_offsets(tmp_path, monkeypatch):
  base = np.arange(24, dtype=np.float32)
  transposed = _Tensor(base, 0, (4, 3), (1, 4))
  shifted = _Tensor(base, 5, (2, 3), (3, 1))
  scalar = _Tensor(base, 7, (), ())
  path = tmp_path / "t.pt"
  write_torch_checkpoint(
    path, {"a": transposed, "b": shifted, "c": scalar, "n": 3}, monkeypatch
  )
  loaded = checkpoint_import.read_torch_checkpoint(str(path))
  np.testing.assert_array_equal(loaded["a"], base[:12].reshape(3, 4).T)
  np.testing.assert_array_equal(loaded["b"], base[5:11].reshape(2, 3))
  assert float(loaded["c"]) == 7.0
  assert loaded["n"] == 3


def test_ghn1_checkpoint_roundtrip(tmp_path, monkeypatch):
  config = ghn_lib.ghn1_config()
  _, variables = ghn_lib.init_ghn(config, jax.random.key(7))
  state = {
    k: _tensor(v) for k, v in torch_state_dict(config, variables).items()
  }
  path = tmp_path / "ghn1.pt"
  checkpoint = {
    "state_dict": collections.OrderedDict(state),
    "config": TORCH_CONFIG_GHN1,
    "epoch": 3,
  }
  write_torch_checkpoint(path, checkpoint, monkeypatch)
  ghn, loaded, info = checkpoint_import.load_torch_ghn(str(path))
  assert ghn.config == config
  assert info == {"epoch": 3}
  flat = traverse_util.flatten_dict(loaded)
  for key, value in traverse_util.flatten_dict(variables).items():
    np.testing.assert_array_equal(flat[key], value, err_msg=str(key))


def test_unknown_global_is_rejected(tmp_path):
  marker = tmp_path / "executed"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"x": Exploit()}))
  with pytest.raises(ValueError, match=r"global (posix|os|nt)\.system"):
    checkpoint_import.read_torch_checkpoint(str(path))
  assert not marker.exists()


def test_file_that_is_not_zip(tmp_path):
  path = tmp_path / "plain.pt"
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="not a zip archive"):
    checkpoint_import.read_torch_checkpoint(str(path))


def test_missing_file_is_not_found(tmp_path):
  path = tmp_path / "missing.pt"
  with pytest.raises(FileNotFoundError, match="not found") as info:
    checkpoint_import.read_torch_checkpoint(str(path))
  assert str(path) in str(info.value)
  assert "zip" not in str(info.value)


def test_zip_without_pickle(tmp_path):
  path = tmp_path / "other.zip"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("readme.txt", "hello")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    checkpoint_import.read_torch_checkpoint(str(path))


def test_checkpoint_without_state_dict(tmp_path, monkeypatch):
  path = tmp_path / "no_state.pt"
  write_torch_checkpoint(path, {"config": TORCH_CONFIG_GHN1}, monkeypatch)
  with pytest.raises(ValueError, match="lacks 'state_dict'"):
    checkpoint_import.load_torch_ghn(str(path))


def test_state_dict_with_missing_and_extra_keys():
  config = ghn_lib.ghn1_config()
  _, variables = ghn_lib.init_ghn(config, jax.random.key(0))
  state = torch_state_dict(config, variables)
  del state["embed.weight"]
  state["gnn.mlp_ve.fc.0.weight"] = np.zeros((16, 32), np.float32)
  with pytest.raises(ValueError) as info:
    checkpoint_import.variables_from_state_dict(state, config)
  assert "missing keys ['embed.weight']" in str(info.value)
  assert "unexpected keys ['gnn.mlp_ve.fc.0.weight']" in str(info.value)


def test_state_dict_with_wrong_shape():
  config = ghn_lib.ghn1_config()
  _, variables = ghn_lib.init_ghn(config, jax.random.key(0))
  state = torch_state_dict(config, variables)
  state["embed.weight"] = np.zeros((14, 32), np.float32)
  with pytest.raises(ValueError, match="op_embed/embedding"):
    checkpoint_import.variables_from_state_dict(state, config)


def test_config_mapping():
  imagenet = dict(
    TORCH_CONFIG_GHN1,
    max_shape=[64, 64, 16, 16],
    num_classes=1000,
    weight_norm=True,
    ve=True,
    layernorm=True,
  )
  assert (
    checkpoint_import.config_from_torch(imagenet)
    == ghn_lib.ghn2_imagenet_config()
  )
  mlp = dict(TORCH_CONFIG_GHN1, hypernet="mlp")
  assert checkpoint_import.config_from_torch(mlp) == ghn_lib.mlp_ghn_config()


@pytest.mark.parametrize(
  "change, message",
  [
    ({"decoder": "mlp"}, "decoder 'mlp' is not supported"),
    ({"hypernet": "gcn"}, "hypernet 'gcn' is not supported"),
    ({"heads": 4}, r"unknown GHN checkpoint config keys \['heads'\]"),
  ],
)
def test_unsupported_config(change, message):
  with pytest.raises(ValueError, match=message):
    checkpoint_import.config_from_torch({**TORCH_CONFIG_GHN1, **change})


@pytest.mark.skipif(
  not (REFERENCE_DIR / "ghn_random.pt").is_file()
  or not (REFERENCE_DIR / "ghn_state_dict.npz").is_file(),
  reason=f"no ghn_random.pt / ghn_state_dict.npz in {REFERENCE_DIR}",
)
def test_reference_checkpoint_matches_state_dict():
  checkpoint = checkpoint_import.read_torch_checkpoint(
    str(REFERENCE_DIR / "ghn_random.pt")
  )
  expected = np.load(REFERENCE_DIR / "ghn_state_dict.npz")
  state = checkpoint["state_dict"]
  assert sorted(state) == sorted(expected.files)
  for key in expected.files:
    np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
