"""Pad GHN inputs to sizes that only grow, to bound GHN compilations.

`ghn.prepare_inputs` pads each dimension of a batch (nodes, sweep levels,
level width, edges per step, decoder positions per block, ...) to its own
size bucket. With a dozen independent dimensions almost every meta-batch
of distinct architectures lands on a new combination, so a jitted GHN
would compile at every step. `GrowingPadder` pads each dimension further,
to the largest size seen so far rounded up to a power of two. Sizes only
grow, and each dimension grows at most log2(largest size) times, so the
number of GHN compilations is bounded by the sum of those counts over the
dimensions, however many architectures the run sees.

Padding does not change the GHN's outputs at the real positions: padded
nodes are never read, padded edges have zero coefficients, padded sweep
steps update only the out-of-range sentinel node, and padded decoder
positions have zero scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

_NODE_KEYS = ("node_ops", "shape_index")
_EDGE_KEYS = ("sweep_sources", "sweep_targets", "sweep_coef")
_SLOT_KEYS = ("class_bias_nodes", "class_weight_fc", "class_weight_scale")
_KNOWN_KEYS = frozenset(
  _NODE_KEYS + _EDGE_KEYS + _SLOT_KEYS + ("sweep_nodes", "fc_nodes", "blocks")
)


def _next_power_of_two(value: int) -> int:
  return 1 << max(0, int(value) - 1).bit_length()


def _pad_axis(x: np.ndarray, axis: int, size: int, value=0) -> np.ndarray:
  """Pad `x` at the end of `axis` to `size` with `value`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return np.pad(x, widths, constant_values=value)


def _pad_steps(x: np.ndarray, num_levels: int, value=0) -> np.ndarray:
  """Insert empty steps between the forward and the backward sweep.

  The schedule has 2L steps: levels 0..L-1 forward, then L-1..0 backward.
  Padding to L' levels adds 2(L' - L) empty steps in the middle.
  """
  half = x.shape[0] // 2
  extra = 2 * num_levels - x.shape[0]
  middle = np.full((extra,) + x.shape[1:], value, x.dtype)
  return np.concatenate([x[:half], middle, x[half:]])


class GrowingPadder:
  """Pads GHN inputs to power-of-two sizes that never shrink."""

  def __init__(self):
    self.sizes: dict[Any, int] = {}
    self._warned = False

  def _size(self, key: Any, need: int) -> int:
    size = self.sizes.get(key, 0)
    if need > size:
      size = _next_power_of_two(need)
      self.sizes[key] = size
    return size

  def pad(self, inputs: dict[str, Any]) -> dict[str, Any]:
    """Return `inputs` padded to the current sizes (which may grow).

    Args:
      inputs: GHN inputs from `ghn.prepare_inputs` (NumPy arrays).

    Returns:
      The padded inputs; the decoding plans of `prepare_inputs` stay valid.
    """
    unknown = set(inputs) - _KNOWN_KEYS
    if unknown and not self._warned:
      logging.warning(
        "GHN inputs %s are not padded; they may cause recompilations.",
        sorted(unknown),
      )
      self._warned = True
    out = dict(inputs)

    num_nodes = inputs["node_ops"].shape[0]
    nodes = self._size("nodes", num_nodes)
    for key in _NODE_KEYS:
      out[key] = _pad_axis(inputs[key], 0, nodes)

    # Sweep schedule: the out-of-range node index marks empty slots.
    sweep_nodes = inputs["sweep_nodes"]
    sweep_nodes = np.where(sweep_nodes >= num_nodes, nodes, sweep_nodes)
    levels = self._size("levels", sweep_nodes.shape[0] // 2)
    width = self._size("width", sweep_nodes.shape[1])
    sweep_nodes = _pad_axis(sweep_nodes, 1, width, value=nodes)
    out["sweep_nodes"] = _pad_steps(sweep_nodes, levels, value=nodes)
    edges = self._size("edges", inputs["sweep_sources"].shape[1])
    for key in _EDGE_KEYS:
      padded = _pad_axis(inputs[key], 1, edges)
      out[key] = _pad_steps(padded, levels)

    out["fc_nodes"] = _pad_axis(
      inputs["fc_nodes"], 0, self._size("fc", len(inputs["fc_nodes"]))
    )
    slots = self._size("slots", len(inputs["class_bias_nodes"]))
    for key in _SLOT_KEYS:
      out[key] = _pad_axis(inputs[key], 0, slots)

    blocks = {}
    for name, block in inputs["blocks"].items():
      self._size(("block", name), len(block["scale"]))
    for key, size in sorted(self.sizes.items(), key=str):
      if not (isinstance(key, tuple) and key[0] == "block"):
        continue
      block = inputs["blocks"].get(key[1])
      if block is None:
        # A block seen in earlier batches: keep it, with no positions used.
        block = {
          "position": np.zeros((0, 3), np.int32),
          "scale": np.zeros((0,), np.float32),
        }
      blocks[key[1]] = {
        "position": _pad_axis(block["position"], 0, size),
        "scale": _pad_axis(block["scale"], 0, size),
      }
    out["blocks"] = blocks
    return out
