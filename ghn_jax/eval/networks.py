"""Networks to evaluate: DeepNets-1M evaluation splits and predefined ones.

A `NetSpec` names one network. `make_builder` turns it into a function that
builds the Flax model, its parameter template, its graph for the GHN and its
apply functions (`ghn_jax.evaluate.EvalNet`). The evaluation calls it when it
reaches the network, so one network at a time is in memory.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghn_jax import evaluate
from ghn_jax.eval import batch_norm

# DeepNets-1M evaluation splits (ppuda `experiments/net_generator.py`):
# in-distribution validation and test networks, and out-of-distribution
# wide, deep, dense and batch-norm-free networks.
SPLITS = ("val", "test", "wide", "deep", "dense", "bnfree")
PREDEFINED_SPLIT = "predefined"
# Predefined networks, adjusted to 32x32 inputs: ResNet-18/50 (torchvision
# layouts, first conv 3x3 with stride 1 and no max pooling), the ViT-style
# network of the original's predefined split (128 channels, 12 cells) and
# DARTS (16 channels, 8 cells).
PREDEFINED = ("resnet18", "resnet50", "vit", "darts")
SPLIT_CHOICES = ("all", *SPLITS, PREDEFINED_SPLIT)
# Networks per split: 500 validation and 500 test networks, 100 in each
# out-of-distribution split, which with the 2 predefined networks of the
# original makes its evaluation set of 1,402 networks.
SPLIT_SIZES = {
  "val": 500,
  "test": 500,
  "wide": 100,
  "deep": 100,
  "dense": 100,
  "bnfree": 100,
}
# Seed and shard size of the evaluation splits, as written by
# `experiments/generate_nets.py --seed 0` (its default shard size).
SPLIT_SEED = 0
SHARD_SIZE = 250
VIT_CHANNELS, VIT_CELLS = 128, 12
DARTS_CHANNELS, DARTS_CELLS = 16, 8
# Batch size of the dummy input used to trace models (shapes only).
_TRACE_BATCH = 2


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """One network to evaluate.

  Attributes:
    split: a DeepNets-1M split or 'predefined'.
    arch: index in the split, or a predefined network's name.
  """

  split: str
  arch: int | str

  @property
  def name(self) -> str:
    return f"{self.split}/{self.arch}" if self.split in SPLITS else self.arch


def list_networks(
  split: str = "all", arch: str | None = None, num_nets: int = 2
) -> list[NetSpec]:
  """List the networks an evaluation covers.

  Args:
    split: 'all', a DeepNets-1M split or 'predefined'.
    arch: one network of `split`: an index for a DeepNets-1M split, a name
      for 'predefined'; None for all (the first `num_nets` of a split).
    num_nets: networks per DeepNets-1M split; 0 for the whole split.

  Returns:
    The network specs, split by split.

  Raises:
    ValueError: for an unknown split or architecture, or `arch` with
      split 'all'.
  """
  if split not in SPLIT_CHOICES:
    raise ValueError(
      f"Unknown split {split!r}; use one of {', '.join(SPLIT_CHOICES)}."
    )
  if arch is not None:
    if split == "all":
      raise ValueError(
        f"--arch {arch} needs a --split: one of {', '.join(SPLIT_CHOICES[1:])}."
      )
    return [_parse_arch(split, arch)]
  splits = (*SPLITS, PREDEFINED_SPLIT) if split == "all" else (split,)
  specs = []
  for name in splits:
    if name == PREDEFINED_SPLIT:
      specs += [NetSpec(name, arch_name) for arch_name in PREDEFINED]
    else:
      count = split_size(name) if num_nets == 0 else num_nets
      specs += [NetSpec(name, i) for i in range(min(count, split_size(name)))]
  return specs


def _parse_arch(split: str, arch: str) -> NetSpec:
  """Validate `arch` for `split` and return its spec."""
  if split == PREDEFINED_SPLIT:
    if arch.lower() not in PREDEFINED:
      raise ValueError(
        f"Unknown predefined architecture {arch!r}; use one of "
        f"{', '.join(PREDEFINED)}."
      )
    return NetSpec(split, arch.lower())
  size = split_size(split)
  try:
    index = int(arch)
  except ValueError:
    raise ValueError(
      f"--arch for split {split!r} must be an index in 0..{size - 1}, got "
      f"{arch!r} (names like {PREDEFINED[0]!r} need --split predefined)."
    ) from None
  if not 0 <= index < size:
    raise ValueError(
      f"Architecture index {index} is out of range for split {split!r}, "
      f"which has {size} networks (0..{size - 1})."
    )
  return NetSpec(split, index)


# ---------------------------------------------------------------------------
# Adapters to the model sources.


def split_size(split: str) -> int:
  """Return the number of networks in a DeepNets-1M evaluation split."""
  if split not in SPLIT_SIZES:
    raise ValueError(
      f"Unknown DeepNets-1M evaluation split {split!r}; use one of "
      f"{', '.join(SPLITS)}."
    )
  return SPLIT_SIZES[split]


@functools.cache
def _shard_configs(split: str, shard: int, num: int) -> tuple:
  """Sample the first `num` architectures of one shard of a split."""
  from ghn_jax.deepnets1m import sampler  # noqa: PLC0415

  rng = sampler.split_rng(split, SPLIT_SEED, shard)
  return tuple(
    arch.config for arch in sampler.sample_architectures(split, num, rng)
  )


def split_config(split: str, index: int):
  """Return the `NetConfig` of network `index` of a DeepNets-1M split.

  The architectures are those `ghn_jax.deepnets1m.dataset.generate_split`
  writes for seed `SPLIT_SEED` (shards of `SHARD_SIZE` networks, each from
  its own random stream), at evaluation width (4x channels for 'wide').
  """
  from ghn_jax.deepnets1m import sampler  # noqa: PLC0415

  size = split_size(split)
  if not 0 <= index < size:
    raise ValueError(
      f"Architecture index {index} is out of range for split {split!r}, "
      f"which has {size} networks (0..{size - 1})."
    )
  shard, position = divmod(index, SHARD_SIZE)
  config = _shard_configs(split, shard, position + 1)[position]
  return sampler.eval_width(split, config)


def _deepnets1m_model(spec: NetSpec, num_classes: int) -> nn.Module:
  """Build the Flax network of a DeepNets-1M split entry."""
  from ghn_jax.deepnets1m import Network  # noqa: PLC0415

  config = split_config(spec.split, int(spec.arch))
  return Network(config.replace(num_classes=num_classes))


def _predefined_model(name: str, num_classes: int) -> nn.Module:
  """Build a predefined network for 32x32 inputs."""
  from ghn_jax.deepnets1m import DARTS, VIT, NetConfig, Network  # noqa: PLC0415

  if name == "vit":
    config = NetConfig(
      genotype=VIT,
      channels=VIT_CHANNELS,
      num_cells=VIT_CELLS,
      num_classes=num_classes,
      preprocess=False,
      channel_multiplier=1,
    )
    return Network(config)
  if name == "darts":
    config = NetConfig(
      genotype=DARTS,
      channels=DARTS_CHANNELS,
      num_cells=DARTS_CELLS,
      num_classes=num_classes,
    )
    return Network(config)
  from ghn_jax import zoo  # noqa: PLC0415

  model, _ = zoo.create_model(name, num_classes=num_classes)
  return model


def build_eval_net(
  name: str,
  split: str,
  model: nn.Module,
  image_size: int,
  with_graph: bool = True,
) -> evaluate.EvalNet:
  """Wrap a Flax classifier into an `EvalNet`.

  Two kinds of models are supported: the DeepNets-1M networks (batch norm
  through `ghn_jax.nn_ops`, only a 'params' collection) and models with
  `flax.linen.BatchNorm` layers and a `train` flag (a 'batch_stats'
  collection, e.g. the ResNets of `ghn_jax.zoo`). The parameter template
  has the model's shapes (zeros, traced with `jax.eval_shape`, so nothing
  is initialised or compiled here).

  Args:
    name: network name in reports.
    split: split name in reports.
    model: the Flax module.
    image_size: input height and width.
    with_graph: build the GHN graph (False for baselines only).

  Returns:
    The network.
  """
  from ghn_jax import graph_builder  # noqa: PLC0415

  dummy = jnp.zeros((_TRACE_BATCH, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)
  variables = jax.tree_util.tree_map(
    lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes)
  )
  params = variables["params"]
  if "batch_stats" in variables:
    apply_fn, collect_fn = batch_norm.make_flax_batch_norm_fns(
      model, variables["batch_stats"]
    )
    has_batch_norm = True
    apply_kwargs = {"train": False}
  else:

    def apply_batch_fn(p, images):
      return model.apply({"params": p}, images)

    apply_fn, collect_fn = batch_norm.make_batch_stats_fns(apply_batch_fn)
    calls = batch_norm.count_batch_norm_calls(collect_fn, params, dummy)
    has_batch_norm = calls > 0
    apply_kwargs = None

  graph = None
  if with_graph:
    graph = graph_builder.build_graph(
      model,
      variables,
      input_shape=(1, image_size, image_size, 3),
      apply_kwargs=apply_kwargs,
    )
  return evaluate.EvalNet(
    name=name,
    split=split,
    graph=graph,
    params=params,
    apply_fn=apply_fn,
    collect_batch_stats_fn=collect_fn,
    has_batch_norm=has_batch_norm,
  )


def make_builder(
  spec: NetSpec,
  num_classes: int,
  image_size: int = 32,
  with_graph: bool = True,
) -> Callable[[], evaluate.EvalNet]:
  """Return a function that builds the `EvalNet` of `spec`."""

  def build() -> evaluate.EvalNet:
    if spec.split == PREDEFINED_SPLIT:
      model = _predefined_model(str(spec.arch), num_classes)
    else:
      model = _deepnets1m_model(spec, num_classes)
    return build_eval_net(spec.name, spec.split, model, image_size, with_graph)

  return build
