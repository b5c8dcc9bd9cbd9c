"""Import the original GHN checkpoints (PyTorch, ppuda) without PyTorch.

A checkpoint saved by `torch.save` is a zip archive holding `data.pkl` (the
pickled object) and the raw bytes of every tensor storage under `data/`.
`read_torch_checkpoint` unpickles it with a restricted unpickler that accepts
only the few globals a state dict needs (tensor rebuilding, storage types,
`OrderedDict`) and rejects every other global, so no code from the file
runs. `variables_from_state_dict` maps the PyTorch parameter names of a
ppuda GHN onto the variables of `ghn_jax.ghn.GHN` (transposing dense and
1x1-convolution weights).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ghn_jax import ghn as ghn_lib

# Storage classes of `torch.save` and the dtype of their bytes.
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": None,  # Converted by hand below.
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_BFLOAT16_SHIFT = 16

# Config keys of ppuda's GHN constructor and the matching GHNConfig fields.
_CONFIG_FIELDS = {
  "max_shape": "max_shape",
  "num_classes": "num_classes",
  "hid": "hid",
  "weight_norm": "weight_norm",
  "ve": "virtual_edges",
  "layernorm": "layernorm",
}
_HYPERNETS = {"gatedgnn": "gated", "mlp": "mlp"}
_IGNORED_CONFIG_KEYS = ("debug_level",)


class _StorageType:
  """Placeholder for a torch storage class named in the pickle."""

  def __init__(self, name: str):
    self.name = name


class _Storage:
  """Raw bytes of one storage, typed."""

  def __init__(self, array: np.ndarray):
    self.array = array


def _rebuild_tensor_v2(
  storage: _Storage,
  storage_offset: int,
  size: tuple[int, ...],
  stride: tuple[int, ...],
  requires_grad: bool = False,
  backward_hooks: Any = None,
  metadata: Any = None,
) -> np.ndarray:
  """Rebuild a tensor as a NumPy array from its storage and strides."""
  del requires_grad, backward_hooks, metadata
  flat = storage.array
  itemsize = flat.dtype.itemsize
  if not size:
    return flat[storage_offset].copy()
  extent = storage_offset + sum(
    (s - 1) * st for s, st in zip(size, stride, strict=True)
  )
  if min(size) > 0 and extent >= flat.size:
    raise ValueError(
      f"tensor of size {tuple(size)} and stride {tuple(stride)} reads past "
      f"its storage of {flat.size} elements; the checkpoint is corrupt."
    )
  view = np.lib.stride_tricks.as_strided(
    flat[storage_offset:],
    shape=tuple(size),
    strides=tuple(s * itemsize for s in stride),
    writeable=False,
  )
  return np.array(view)


def _rebuild_parameter(
  data: np.ndarray, requires_grad: bool, backward_hooks: Any
) -> np.ndarray:
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that rebuilds tensors and rejects every other global."""

  def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
      f"the checkpoint refers to the global {module}.{name}, which a GHN "
      "checkpoint does not contain; refusing to load it (only tensors, "
      "storages and OrderedDict are allowed)."
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}.")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError as e:
        raise ValueError(f"the checkpoint lacks the storage {name!r}.") from e
      dtype = _STORAGE_DTYPES[storage_type.name]
      if dtype is None:
        bits = np.frombuffer(raw, np.uint16).astype(np.uint32)
        array = (bits << _BFLOAT16_SHIFT).view(np.float32)
      else:
        array = np.frombuffer(raw, dtype)
      if array.size < numel:
        raise ValueError(
          f"storage {name!r} has {array.size} elements, expected {numel}."
        )
      self._storages[key] = _Storage(array)
    return self._storages[key]


def read_torch_checkpoint(path: str) -> Any:
  """Load a `torch.save` zip checkpoint with tensors as NumPy arrays.

  Args:
    path: the `.pt` file.

  Returns:
    The unpickled object (dicts, lists, numbers, strings, NumPy arrays).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the file is not a zip archive with a `data.pkl`, or the
      pickle refers to anything but tensors (never executes its code).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"checkpoint file not found: {path}; pass the path of a .pt file "
      "written by torch.save."
    )
  if not zipfile.is_zipfile(path):
    raise ValueError(
      f"{path} is not a zip archive: expected a checkpoint written by "
      "torch.save (PyTorch >= 1.6); re-save legacy checkpoints with a newer "
      "PyTorch first."
    )
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(
        f"{path} is a zip archive but not a PyTorch checkpoint: expected one "
        f"data.pkl, found {pickles}."
      )
    prefix = pickles[0][: -len("data.pkl")]
    data = archive.read(pickles[0])
    unpickler = _RestrictedUnpickler(io.BytesIO(data), archive, prefix)
    try:
      return unpickler.load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"cannot read {path}: {e}") from e


def config_from_torch(config: Mapping[str, Any]) -> ghn_lib.GHNConfig:
  """Map the `config` dict of a ppuda checkpoint to a `GHNConfig`.

  Raises:
    ValueError: for unknown keys, a missing `max_shape`/`num_classes`, or
      a decoder or hypernetwork this package does not implement.
  """
  config = dict(config)
  for key in _IGNORED_CONFIG_KEYS:
    config.pop(key, None)
  known = set(_CONFIG_FIELDS) | {"hypernet", "decoder"}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(
      f"unknown GHN checkpoint config keys {unknown}; known: {sorted(known)}."
    )
  for key in ("max_shape", "num_classes"):
    if key not in config:
      raise ValueError(f"the checkpoint config lacks {key!r}.")
  hypernet = config.get("hypernet", "gatedgnn")
  if hypernet not in _HYPERNETS:
    raise ValueError(
      f"hypernet {hypernet!r} is not supported; expected one of "
      f"{sorted(_HYPERNETS)}."
    )
  decoder = config.get("decoder", "conv")
  if decoder != "conv":
    raise ValueError(
      f"decoder {decoder!r} is not supported: only the conv decoder (used by "
      "all released GHN checkpoints) is implemented."
    )
  values = {
    field: config[key] for key, field in _CONFIG_FIELDS.items() if key in config
  }
  values["max_shape"] = tuple(int(s) for s in values["max_shape"])
  values["gnn"] = _HYPERNETS[hypernet]
  # ppuda's constructor defaults for keys a checkpoint may omit.
  values.setdefault("weight_norm", False)
  values.setdefault("virtual_edges", False)
  values.setdefault("layernorm", False)
  if values["gnn"] == "mlp":
    values["virtual_edges"] = False
  return ghn_lib.GHNConfig(**values)


def _linear(weight: np.ndarray) -> np.ndarray:
  """PyTorch Linear (out, in) or 1x1 Conv2d (out, in, 1, 1) -> (in, out)."""
  if weight.ndim == 4:
    weight = weight[:, :, 0, 0]
  return np.ascontiguousarray(weight.T)


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _dense(torch_prefix: str, flax_path: str) -> dict:
  return {
    f"{torch_prefix}.weight": (f"{flax_path}/kernel", _linear),
    f"{torch_prefix}.bias": (f"{flax_path}/bias", _identity),
  }


def _mlp(torch_prefix: str, flax_path: str, num_layers: int = 2) -> dict:
  # ppuda's MLP interleaves Linear and activation modules: fc.0, fc.2, ...
  out = {}
  for i in range(num_layers):
    out.update(_dense(f"{torch_prefix}.fc.{2 * i}", f"{flax_path}/dense_{i}"))
  return out


def key_map(
  config: ghn_lib.GHNConfig,
) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """PyTorch state-dict key -> (ghn_jax variable path, conversion)."""
  table = {
    "embed.weight": ("op_embed/embedding", _identity),
    "shape_enc.embed_channel.weight": (
      "shape_channel_embed/embedding",
      _identity,
    ),
    "shape_enc.embed_spatial.weight": (
      "shape_spatial_embed/embedding",
      _identity,
    ),
  }
  if config.gnn == "gated":
    table.update(_mlp("gnn.mlp", "message_mlp"))
    if config.virtual_edges:
      table.update(_mlp("gnn.mlp_ve", "virtual_message_mlp"))
    for torch_name, name in (
      ("weight_ih", "input_kernel"),
      ("weight_hh", "hidden_kernel"),
    ):
      table[f"gnn.gru.{torch_name}"] = (f"gru/{name}", _linear)
    table["gnn.gru.bias_ih"] = ("gru/input_bias", _identity)
    table["gnn.gru.bias_hh"] = ("gru/hidden_bias", _identity)
  else:
    table.update(_mlp("gnn", "node_mlp"))
  if config.layernorm:
    table["ln.weight"] = ("layer_norm/scale", _identity)
    table["ln.bias"] = ("layer_norm/bias", _identity)
  table.update(_dense("decoder.fc.0", "decoder_fc"))
  table.update(_dense("decoder.conv.0", "decoder_conv_hidden"))
  table.update(_dense("decoder.conv.2", "decoder_conv_out"))
  table.update(_dense("decoder.class_layer_predictor.1", "decoder_class_layer"))
  table.update(_mlp("decoder_1d", "decoder_1d"))
  table.update(_dense("bias_class.1", "bias_class"))
  return table


def variables_from_state_dict(
  state_dict: Mapping[str, np.ndarray], config: ghn_lib.GHNConfig
) -> dict:
  """Convert a ppuda GHN state dict into `{'params': ...}` of `GHN(config)`.

  Raises:
    ValueError: naming missing or unexpected keys, or a tensor whose shape
      does not fit the config.
  """
  table = key_map(config)
  missing = sorted(set(table) - set(state_dict))
  extra = sorted(set(state_dict) - set(table))
  if missing or extra:
    raise ValueError(
      f"the state dict does not match a GHN with config {config}: missing "
      f"keys {missing}, unexpected keys {extra}."
    )
  flat = {}
  for key, (path, convert) in table.items():
    value = np.asarray(state_dict[key])
    if value.dtype != np.float32:
      value = value.astype(np.float32)
    flat["params/" + path] = convert(value)
  variables = traverse_util.unflatten_dict(flat, sep="/")
  ghn_lib.check_variables(config, variables)
  return variables


def load_torch_ghn(path: str) -> tuple[ghn_lib.GHN, dict, dict]:
  """Read a ppuda checkpoint (`state_dict`, `config`, ...) into a GHN.

  Returns:
    `(ghn, variables, info)`, info holding the checkpoint's other entries
    that are plain values (e.g. `epoch`).

  Raises:
    ValueError: if the file is not a GHN checkpoint (see
      `read_torch_checkpoint`), lacks `state_dict` or `config`, or they do
      not match.
  """
  checkpoint = read_torch_checkpoint(path)
  if not isinstance(checkpoint, Mapping):
    raise ValueError(
      f"{path} contains a {type(checkpoint).__name__}, not a GHN checkpoint "
      "dict with 'state_dict' and 'config'."
    )
  for key in ("state_dict", "config"):
    if key not in checkpoint:
      raise ValueError(
        f"{path} lacks {key!r}: expected a ppuda GHN checkpoint with "
        f"'state_dict' and 'config', found keys {sorted(checkpoint)}."
      )
  config = config_from_torch(checkpoint["config"])
  variables = variables_from_state_dict(checkpoint["state_dict"], config)
  info = {
    k: v
    for k, v in checkpoint.items()
    if isinstance(v, (int, float, str, bool))
  }
  return ghn_lib.GHN(config), variables, info


def convert_checkpoint(in_path: str, out_path: str) -> ghn_lib.GHNConfig:
  """Convert a ppuda `.pt` checkpoint into a ghn_jax `.npz` GHN file.

  Returns:
    The config of the converted GHN.
  """
  ghn, variables, _ = load_torch_ghn(in_path)
  ghn_lib.save_ghn(out_path, ghn.config, variables)
  return ghn.config
