"""Resumable stream of DeepNets-1M architectures for meta-training."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ghn_jax.deepnets1m import NetConfig, sampler

# Candidates drawn per architecture id before giving up on `max_cells`.
_MAX_CELL_REJECTIONS = 1000
# Offset of the per-id random streams, away from the shard streams of the
# on-disk dataset (shard k uses (seed, split stream, k)).
_ID_STREAM_OFFSET = 1 << 40


@dataclasses.dataclass(frozen=True)
class ArchitectureSpace:
  """Architectures a stream draws from, and their widths.

  Attributes:
    split: DeepNets-1M split (`sampler.SPLITS`).
    num_architectures: number of distinct architectures (ids 0..n-1).
    seed: seed of the architectures.
    channels: widths to draw from uniformly; empty for the original's
      training-time width rule (`sampler.sample_training_width`).
    fc_dims: hidden classifier widths to draw from; empty for the rule.
    max_cells: draw again while an architecture has more cells (0: any).
    num_classes: classifier outputs.
    imagenet_input: 224x224 inputs instead of 32x32.
  """

  split: str = "train"
  num_architectures: int = 1_000_000
  seed: int = 0
  channels: tuple[int, ...] = ()
  fc_dims: tuple[int, ...] = ()
  max_cells: int = 0
  num_classes: int = 10
  imagenet_input: bool = False

  def __post_init__(self):
    if self.num_architectures < 1:
      raise ValueError(
        f"num_architectures must be >= 1, got {self.num_architectures}."
      )
    sampler.split_settings(self.split)


def architecture(
  space: ArchitectureSpace, arch_id: int
) -> tuple[NetConfig, int]:
  """Return architecture `arch_id` of a space at generator width.

  The second value is its parameter count at generator width, which the
  training-time width rule reads.

  Each id has its own random stream, so any id is drawn without drawing
  the ones before it.

  Raises:
    ValueError: if the id is out of range, or no architecture within
      `max_cells` is found.
  """
  if not 0 <= arch_id < space.num_architectures:
    raise ValueError(
      f"Architecture id {arch_id} is out of range [0, "
      f"{space.num_architectures})."
    )
  stream = sampler.split_settings(space.split).stream
  rng = np.random.default_rng([space.seed, stream, _ID_STREAM_OFFSET + arch_id])
  for _ in range(_MAX_CELL_REJECTIONS):
    arch = next(sampler.sample_architectures(space.split, 1, rng))
    if not space.max_cells or arch.config.num_cells <= space.max_cells:
      return arch.config, arch.num_params_cifar
  raise ValueError(
    f"No architecture with at most {space.max_cells} cells in "
    f"{_MAX_CELL_REJECTIONS} draws: raise max_cells."
  )


def sized_architecture(
  space: ArchitectureSpace, arch_id: int, rng: np.random.Generator
) -> NetConfig:
  """Return architecture `arch_id` at a width drawn from `rng`."""
  config, num_params = architecture(space, arch_id)
  channels, fc_dim = sampler.sample_training_width(config, num_params, rng)
  if space.channels:
    channels = int(rng.choice(space.channels))
  if space.fc_dims:
    fc_dim = int(rng.choice(space.fc_dims))
  return config.replace(
    channels=channels,
    fc_dim=fc_dim,
    num_classes=space.num_classes,
    imagenet_input=space.imagenet_input,
  )


class ArchitectureStream:
  """Endless, resumable stream of meta-batches of architectures.

  Epoch `e` visits the ids in a permutation drawn from `(seed, e)`; the
  widths of the architectures of step `s` come from `(seed, s)`. The
  position `(epoch, index, step)` determines all later meta-batches.
  """

  def __init__(self, space: ArchitectureSpace, meta_batch_size: int):
    if meta_batch_size < 1:
      raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}.")
    self.space = space
    self.meta_batch_size = meta_batch_size
    self.epoch = 0
    self.index = 0
    self.step = 0
    self._order = None
    self._order_epoch = -1

  def get_state(self) -> dict[str, int]:
    """Return the stream position, to store in a checkpoint."""
    return {"epoch": self.epoch, "index": self.index, "step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    """Move the stream to a position saved by `get_state`."""
    self.epoch = int(state["epoch"])
    self.index = int(state["index"])
    self.step = int(state["step"])

  def _next_id(self) -> int:
    if self._order_epoch != self.epoch:
      rng = np.random.default_rng((self.space.seed, self.epoch))
      self._order = rng.permutation(self.space.num_architectures)
      self._order_epoch = self.epoch
    arch_id = int(self._order[self.index])
    self.index += 1
    if self.index >= self.space.num_architectures:
      self.epoch += 1
      self.index = 0
    return arch_id

  def __iter__(self) -> ArchitectureStream:
    return self

  def __next__(self) -> tuple[list[int], list[NetConfig]]:
    ids = [self._next_id() for _ in range(self.meta_batch_size)]
    rng = np.random.default_rng((self.space.seed, self.step, 1))
    configs = [sized_architecture(self.space, i, rng) for i in ids]
    self.step += 1
    return ids, configs


def held_out_architectures(
  space: ArchitectureSpace, num: int, seed: int = 0
) -> Sequence[NetConfig]:
  """Draw `num` architectures of a space at widths drawn from `seed`."""
  rng = np.random.default_rng((seed, space.seed))
  return [sized_architecture(space, i, rng) for i in range(num)]
