"""Loading a GHN for evaluation, with checks against the dataset.

Accepts a ghn_jax checkpoint directory (as meta-training writes), a GHN
`.npz` file (`ghn_jax.ghn.save_ghn`) or an original GHN-2 `.pt` file
(ppuda), which is converted on the fly without PyTorch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ghn_jax import ghn as ghn_lib
from ghn_jax.evaluate import PredictFn

# Largest kernel the GHN-2 decoders predict for 32x32 images; GHNs trained
# on 224x224 ImageNet images predict up to 16x16 (ppuda `config.py`).
CIFAR_MAX_KERNEL = ghn_lib.CIFAR10_MAX_SHAPE[2]
IMAGENET_MAX_KERNEL = ghn_lib.IMAGENET_MAX_SHAPE[2]
CIFAR_IMAGE_SIZE = 32
TORCH_FILE_SUFFIX = ".pt"
# File of the final GHN in a meta-training directory
# (`ghn_jax.train.loop.GHN_FILE`).
FINAL_GHN_FILE = "ghn.npz"


@dataclasses.dataclass(frozen=True)
class LoadedGhn:
  """A GHN ready to predict parameters.

  Attributes:
    predict_fn: `predict_fn(graph, params_template) -> params`.
    config: the GHN's hyper-parameters.
    variables: the GHN's variables (`{'params': ...}`).
    description: JSON-ready summary for reports (path, format, config).
  """

  predict_fn: PredictFn
  config: ghn_lib.GHNConfig
  variables: Any
  description: dict[str, Any]


def backend_description() -> str:
  """Describe the JAX backend, e.g. 'jax 0.10.2 on cpu (1 device)'."""
  devices = jax.devices()
  return (
    f"jax {jax.__version__} on {devices[0].platform} "
    f"({len(devices)} device{'s' if len(devices) > 1 else ''})"
  )


def _missing_message(path: str) -> str:
  """Say what to do when no checkpoint is at `path`."""
  return (
    f"GHN checkpoint {path!r} not found. Run `make meta-train` to train "
    "one (it writes workdir/cpu_default), or pass --ckpt with a ghn_jax "
    "checkpoint directory, a GHN .npz file or an original GHN-2 .pt file."
  )


def _read_checkpoint(path: str) -> tuple[ghn_lib.GHN, Any, str]:
  """Read a GHN from a directory, `.npz` or `.pt` path."""
  if os.path.isdir(path):
    return _read_directory(path)
  if not os.path.exists(path):
    raise FileNotFoundError(_missing_message(path))
  if path.endswith(TORCH_FILE_SUFFIX):
    from ghn_jax import checkpoint_import  # noqa: PLC0415

    ghn, variables, _ = checkpoint_import.load_torch_ghn(path)
    return ghn, variables, "ppuda .pt (converted)"
  ghn, variables = ghn_lib.load_ghn(path)
  return ghn, variables, "ghn_jax .npz"


def _read_directory(path: str) -> tuple[ghn_lib.GHN, Any, str]:
  """Read the GHN of a meta-training directory.

  The final GHN (`ghn.npz`, written when meta-training ends) is preferred;
  without it, the GHN of the latest orbax checkpoint of an unfinished run is
  used.
  """
  from ghn_jax.train import checkpoint as train_checkpoint  # noqa: PLC0415

  final = os.path.join(path, FINAL_GHN_FILE)
  if os.path.exists(final):
    ghn, variables = ghn_lib.load_ghn(final)
    return ghn, variables, f"ghn_jax .npz ({FINAL_GHN_FILE})"

  checkpoints = os.path.join(path, train_checkpoint.CHECKPOINT_DIR)
  if os.path.isdir(checkpoints):
    manager = ocp.CheckpointManager(
      os.path.abspath(checkpoints), item_names=("state", "meta")
    )
    step = manager.latest_step()
    if step is not None:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
        ),
      )
      config = ghn_lib.GHNConfig.from_json(restored["meta"]["ghn_config"])
      variables = jax.tree_util.tree_map(
        jnp.asarray, restored["state"]["params"]
      )
      ghn_lib.check_variables(config, variables)
      return ghn_lib.GHN(config), variables, f"orbax checkpoint, step {step}"

  raise FileNotFoundError(
    f"No GHN in directory {path!r}: neither {FINAL_GHN_FILE} nor a "
    f"checkpoint in {train_checkpoint.CHECKPOINT_DIR}/. Run `make "
    "meta-train` to train one, or pass --ckpt with a ghn_jax checkpoint "
    "directory, a GHN .npz file or an original GHN-2 .pt file."
  )


def check_compatible(
  config: ghn_lib.GHNConfig, path: str, num_classes: int, image_size: int
) -> None:
  """Raise ValueError unless the GHN fits the dataset's classes and size.

  Args:
    config: the GHN's hyper-parameters.
    path: checkpoint path, for the message.
    num_classes: classes of the evaluation dataset.
    image_size: height and width of its images.
  """
  if config.num_classes != num_classes:
    raise ValueError(
      f"The GHN in {path!r} was trained for {config.num_classes} classes, "
      f"but the evaluation dataset has {num_classes}. Use a dataset with "
      f"{config.num_classes} classes (--dataset) or a GHN trained on this "
      "one (--ckpt)."
    )
  kernel = config.max_shape[2]
  expected = (
    CIFAR_MAX_KERNEL
    if image_size <= CIFAR_IMAGE_SIZE
    else (IMAGENET_MAX_KERNEL)
  )
  if kernel != expected:
    trained_for = "224x224" if kernel == IMAGENET_MAX_KERNEL else "32x32"
    raise ValueError(
      f"The GHN in {path!r} predicts kernels up to {kernel}x{kernel}, the "
      f"setting for {trained_for} images, but the evaluation images are "
      f"{image_size}x{image_size}. Use a GHN trained on "
      f"{image_size}x{image_size} images (--ckpt)."
    )


def load_ghn(path: str, num_classes: int, image_size: int) -> LoadedGhn:
  """Load a GHN checkpoint and check that it fits the evaluation data.

  Args:
    path: a ghn_jax checkpoint directory, a GHN `.npz` file or a ppuda
      `.pt` file.
    num_classes: classes of the evaluation dataset.
    image_size: height and width of its images.

  Returns:
    The loaded GHN.

  Raises:
    FileNotFoundError: if there is no checkpoint at `path`.
    ValueError: if the checkpoint is invalid or was trained for another
      number of classes or image size.
  """
  ghn, variables, kind = _read_checkpoint(path)
  check_compatible(ghn.config, path, num_classes, image_size)

  def predict_fn(graph, params_template):
    return ghn_lib.predict_params(ghn, variables, graph, params_template)

  description = {"path": path, "format": kind}
  description.update(dataclasses.asdict(ghn.config))
  return LoadedGhn(predict_fn, ghn.config, variables, description)
