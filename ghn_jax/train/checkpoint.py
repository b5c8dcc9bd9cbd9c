"""Atomic checkpoints of meta-training with orbax `CheckpointManager`."""

from __future__ import annotations

import logging as python_logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
# Python loggers of libraries whose INFO lines the command-line tools hide.
QUIET_LOGGERS = ("jax", "orbax")
# Orbax logs through `absl.logging`, so its records come from the shared
# "absl" logger and are recognised by the path of the emitting file.
_ORBAX_PATH_PART = os.sep + "orbax" + os.sep


class _OrbaxInfoFilter(python_logging.Filter):
  """Drop records below WARNING emitted from orbax source files."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.levelno >= python_logging.WARNING:
      return True
    return _ORBAX_PATH_PART not in record.pathname


def quiet_library_logging() -> None:
  """Hide the INFO logs of orbax and jax; keep this project's INFO logs.

  Orbax logs about 15 INFO lines per checkpoint, and jax logs "Unable to
  initialize backend 'tpu'" on machines without a TPU.
  """
  for name in QUIET_LOGGERS:
    python_logging.getLogger(name).setLevel(python_logging.WARNING)
  absl_logger = python_logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxInfoFilter())


def create_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """Create the checkpoint manager of a run directory."""
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
    directory, options=options, item_names=("state", "meta")
  )


def all_finite(tree: PyTree) -> bool:
  """Return whether every floating-point leaf of a pytree is finite."""
  for leaf in jax.tree_util.tree_leaves(tree):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
      return False
  return True


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: PyTree,
  meta: dict[str, Any],
) -> None:
  """Save the train state and JSON metadata (stream positions, config).

  Orbax writes to a temporary directory and renames it when complete, so an
  interrupted save leaves no partial checkpoint.

  Raises:
    ValueError: if the state contains a non-finite value (never saved).
  """
  if not all_finite(state):
    raise ValueError(
      f"Refusing to save checkpoint {step}: the train state has a NaN or "
      "infinite value."
    )
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
    ),
  )
  manager.wait_until_finished()
  logging.info("Saved checkpoint %d in %s.", step, manager.directory)


def restore_latest(
  manager: ocp.CheckpointManager, template: PyTree
) -> tuple[int, PyTree, dict[str, Any]] | None:
  """Restore the latest checkpoint into the structure of `template`.

  Returns:
    `(step, state, meta)`, or None if the directory has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()
    ),
  )
  logging.info("Restored checkpoint %d from %s.", step, manager.directory)
  return step, restored["state"], restored["meta"]


def restore_latest_meta(
  manager: ocp.CheckpointManager,
) -> dict[str, Any] | None:
  """Restore only the JSON metadata of the latest checkpoint.

  Returns:
    The metadata, or None if the directory has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
  )
  return restored["meta"]
