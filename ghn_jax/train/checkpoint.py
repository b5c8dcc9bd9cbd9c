"""Atomic checkpoints of meta-training with orbax `CheckpointManager`."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
CHECKPOINT_DIR = "checkpoints"


def create_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """Create the checkpoint manager of a run directory."""
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
    directory, options=options, item_names=("state", "meta")
  )


def all_finite(tree: PyTree) -> bool:
  """Whether every floating-point leaf of a pytree is finite."""
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
    ValueError: if the state holds a non-finite value (never saved).
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
