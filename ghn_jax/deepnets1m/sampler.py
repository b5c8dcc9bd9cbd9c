"""Random architectures of DeepNets-1M, split by split.

Follows the rules of the original generator (`experiments/net_generator.py`
of ppuda, Knyazev et al., 2021). It draws a number of cells, sum nodes per
cell, a random genotype over the 15 operations, and the stem, classifier
and normalisation settings. It then rejects genotypes that are hard to
train, networks over a parameter cap and networks without a path from input
to output.

Randomness comes from one `numpy.random.Generator`, so a split is
reproducible from a seed. The original interleaves torch, numpy and Python
RNGs (and draws from the torch RNG while building each network), so the
same seed does not give the original's architectures, only the same
distributions.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import numpy as np

from ghn_jax.deepnets1m import genotypes as genotypes_lib
from ghn_jax.deepnets1m import plan as plan_lib
from ghn_jax.deepnets1m.config import NetConfig

# Width at which the generator builds networks to count their parameters.
GENERATOR_CHANNELS = 32
GENERATOR_FC_DIM = 256
GENERATOR_NUM_CLASSES = 10
# Architecture logits of `sample_genotype`: 1e-3 * N(0, 1), as in DARTS's
# initialisation; logits of excluded operations are set far below.
GENOTYPE_LOGIT_SCALE = 1e-3
_EXCLUDED_LOGIT = -1000.0
# Operations allowed in a pooling-only reduction cell (none, max_pool,
# avg_pool, skip_connect: the first four of OPERATIONS).
NUM_POOL_ONLY_OPERATIONS = 4
# Probability of each binary coin of the generator.
HALF = 0.5
# Probability that a network has a flattening head (not global pooling).
FLATTEN_HEAD_PROB = 0.1
# Probability that a ViT-style network with one sum node and no channel
# multiplier gets preprocessing (search split: others without it 0.2).
VIT_PREPROCESS_PROB = 0.2
SEARCH_NO_PREPROCESS_PROB = 0.2
STEM_KERNEL_SIZES = (3, 5, 7)
CHANNEL_MULTIPLIERS = (1, 2)
MAX_FC_LAYERS = 2
LARGE_CONVS = ("conv_5x5", "conv_7x7")

SPLITS = ("train", "val", "test", "search", "wide", "deep", "dense", "bnfree")
# Splits whose networks are widened at evaluation time, and by how much.
WIDE_FACTOR_CIFAR = 4
WIDE_FACTOR_IMAGENET = 2


@dataclasses.dataclass(frozen=True)
class SplitSettings:
  """Ranges of the generator for one split.

  Attributes:
    min_steps: minimum number of sum nodes per cell.
    medium_steps: maximum number of sum nodes per cell in deep networks.
    max_steps: maximum number of sum nodes per cell in shallow networks.
    min_cells: minimum number of cells.
    deep_thresholds: a network is deep when it has more cells than a
      threshold drawn from these.
    max_cells: maximum number of cells.
    max_params: parameter cap at 32 channels (CIFAR and ImageNet inputs).
    norm: 'random' (batch norm, or none with probability 1/2 for networks
      of at most `min_cells + 1` cells and `medium_steps` sum nodes), 'bn'
      (always batch norm) or 'none' (never).
    search_preprocess: the search split's rule for optional
      preprocessing.
    stream: index of the random stream: splits with equal streams (test
      and wide) sample the same architectures.
  """

  min_steps: int = 1
  medium_steps: int = 2
  max_steps: int = 4
  min_cells: int = 4
  deep_thresholds: tuple[int, ...] = (7, 8, 9, 10)
  max_cells: int = 18
  max_params: int = 10**7
  norm: str = "random"
  search_preprocess: bool = False
  stream: int = 0


_SPLIT_SETTINGS = {
  "train": SplitSettings(stream=0),
  "val": SplitSettings(stream=1),
  "test": SplitSettings(stream=2),
  # Wide nets are the test nets, evaluated with more channels.
  "wide": SplitSettings(stream=2),
  "search": SplitSettings(
    medium_steps=3,
    max_steps=6,
    min_cells=6,
    deep_thresholds=(10,),
    max_cells=20,
    norm="bn",
    search_preprocess=True,
    stream=3,
  ),
  "deep": SplitSettings(
    min_cells=10,
    deep_thresholds=(18,),
    max_cells=36,
    max_params=10**8,
    stream=4,
  ),
  "dense": SplitSettings(
    min_steps=2, medium_steps=6, max_steps=10, max_params=10**8, stream=5
  ),
  "bnfree": SplitSettings(norm="none", stream=6),
}


def split_settings(split: str) -> SplitSettings:
  """Return the generator settings of a split.

  Raises:
    ValueError: if `split` is not one of `SPLITS`.
  """
  if split not in _SPLIT_SETTINGS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return _SPLIT_SETTINGS[split]


def _parse_cell(
  probs: np.ndarray, steps: int, allowed: np.ndarray
) -> tuple[genotypes_lib.Edge, ...]:
  """Pick two inputs and one operation per sum node (DARTS discretisation).

  Each sum node keeps the two input states whose best allowed operation
  has the highest probability, and uses that operation on each.
  """
  masked = np.where(allowed, probs, -np.inf)
  best_op = np.argmax(masked, axis=1)
  best_prob = masked[np.arange(len(masked)), best_op]
  edges = []
  start = 0
  for step in range(steps):
    num_inputs = genotypes_lib.NUM_CELL_INPUTS + step
    rows = np.arange(start, start + num_inputs)
    # Stable sort on the negated score keeps the lower state first on ties.
    order = np.argsort(-best_prob[rows], kind="stable")[:2]
    for state in order:
      op = genotypes_lib.OPERATIONS[best_op[rows[state]]]
      edges.append((op, int(state)))
    start += num_inputs
  return tuple(edges)


def sample_genotype(
  rng: np.random.Generator,
  steps: int = 1,
  only_pool: bool = False,
  allow_none: bool = True,
  drop_concat: bool = True,
  allow_transformer: bool = False,
) -> genotypes_lib.Genotype:
  """Sample a genotype the way the original generator does.

  Architecture logits are drawn from 1e-3 * N(0, 1) per (edge, operation)
  and discretised as in DARTS, so every operation is about equally likely.

  Args:
    rng: the random generator.
    steps: sum nodes per cell.
    only_pool: restrict the reduction cell to none, pooling and skip.
    allow_none: allow the `none` operation.
    drop_concat: leave each sum node but the last out of the concatenation
      with probability 1/2.
    allow_transformer: allow the `msa` operation.

  Returns:
    The genotype (the same concatenation for both cell types).

  Raises:
    ValueError: if `steps` < 1.
  """
  if steps < 1:
    raise ValueError(f"steps={steps!r} must be at least 1.")
  num_ops = len(genotypes_lib.OPERATIONS)
  num_edges = sum(genotypes_lib.NUM_CELL_INPUTS + i for i in range(steps))
  logits = GENOTYPE_LOGIT_SCALE * rng.standard_normal((2, num_edges, num_ops))
  allowed = np.ones((2, num_ops), bool)
  if only_pool:
    logits[1, :, NUM_POOL_ONLY_OPERATIONS:] = _EXCLUDED_LOGIT
  if not allow_transformer:
    logits[:, :, genotypes_lib.OPERATION_INDEX["msa"]] = _EXCLUDED_LOGIT
  if not allow_none:
    allowed[:, genotypes_lib.OPERATION_INDEX["none"]] = False
  exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs = exp / exp.sum(axis=-1, keepdims=True)
  normal = _parse_cell(probs[0], steps, allowed[0])
  reduce = _parse_cell(probs[1], steps, allowed[1])

  last = genotypes_lib.NUM_CELL_INPUTS + steps - 1
  concat = []
  for state in range(genotypes_lib.NUM_CELL_INPUTS, last + 1):
    # The last sum node always joins, so no sum node is lost entirely.
    if not drop_concat or state == last or rng.random() > HALF:
      concat.append(state)
  return genotypes_lib.Genotype(normal, tuple(concat), reduce, tuple(concat))


def genotype_rejection(genotype: genotypes_lib.Genotype) -> str | None:
  """Return why the generator rejects a genotype, or None to keep it.

  The original rejects squeeze-excitation (`cse`) without any convolution
  and more than one `cse` in a cell type, because GHN training on those
  often diverged. It rejects more than one 5x5/7x7 dense conv in a cell
  type to save memory, and genotypes without any conv, `cse` or `msa`,
  which have nothing to learn.
  """
  ops = genotype.all_ops()
  has_cse = "cse" in ops
  has_msa = "msa" in ops
  has_conv = any("conv" in op for op in ops)
  for cell in (genotype.normal, genotype.reduce):
    cell_ops = [op for op, _ in cell]
    if cell_ops.count("cse") > 1:
      return "two cse in a cell"
    if sum(op in LARGE_CONVS for op in cell_ops) > 1:
      return "two large convs in a cell"
  if has_cse and not has_conv:
    return "cse without conv"
  if not (has_cse or has_msa or has_conv):
    return "no learnable operation"
  return None


def _sample_candidate(
  rng: np.random.Generator, settings: SplitSettings
) -> tuple[NetConfig | None, str | None]:
  """Draw one candidate network at generator width; return (config, reason)."""
  num_cells = int(rng.integers(settings.min_cells, settings.max_cells + 1))
  deep_threshold = int(rng.choice(settings.deep_thresholds))
  deep = num_cells > deep_threshold
  max_steps = settings.medium_steps if deep else settings.max_steps
  steps = int(rng.integers(settings.min_steps, max_steps + 1))
  only_pool = bool(rng.random() > HALF)
  drop_concat = bool(rng.random() > HALF) if steps > 1 else False
  genotype = sample_genotype(
    rng,
    steps=steps,
    only_pool=only_pool,
    allow_none=steps > 1,
    drop_concat=drop_concat,
    allow_transformer=True,
  )
  reason = genotype_rejection(genotype)
  if reason is not None:
    return None, reason

  stem_kernel_size = int(rng.choice(STEM_KERNEL_SIZES))
  vit = genotype.has_op("msa")
  channel_multiplier = int(rng.choice(CHANNEL_MULTIPLIERS))
  if steps > 1 or channel_multiplier > 1:
    preprocess = True
  elif settings.search_preprocess:
    threshold = 1 - VIT_PREPROCESS_PROB if vit else SEARCH_NO_PREPROCESS_PROB
    preprocess = bool(rng.random() > threshold)
  else:
    preprocess = (not vit) or bool(rng.random() > 1 - VIT_PREPROCESS_PROB)
  global_pooling = vit or deep or bool(rng.random() > FLATTEN_HEAD_PROB)
  if settings.norm == "none":
    norm = None
  elif settings.norm == "bn":
    norm = "bn"
  elif num_cells <= settings.min_cells + 1 and steps <= settings.medium_steps:
    norm = "bn" if rng.random() < HALF else None
  else:
    norm = "bn"
  stem_type = int(rng.integers(0, 2))
  stem_pool = stem_type == 0 and bool(rng.random() > HALF)
  num_fc_layers = int(rng.integers(1, MAX_FC_LAYERS + 1))
  config = NetConfig(
    genotype=genotype,
    channels=GENERATOR_CHANNELS,
    num_classes=GENERATOR_NUM_CLASSES,
    num_cells=num_cells,
    stem_kernel_size=stem_kernel_size,
    imagenet_input=False,
    stem_pool=stem_pool,
    stem_type=stem_type,
    norm=norm,
    preprocess=preprocess,
    channel_multiplier=channel_multiplier,
    num_fc_layers=num_fc_layers,
    fc_dim=GENERATOR_FC_DIM,
    global_pooling=global_pooling,
  )
  try:
    for imagenet_input in (False, True):
      size = plan_lib.count_params(
        config.replace(imagenet_input=imagenet_input), include_dead=True
      )
      if size > settings.max_params:
        return None, "too many parameters"
  except ValueError:
    return None, "disconnected"
  return config, None


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A sampled network with the parameter counts the generator records.

  Attributes:
    config: the network at generator width (32 channels, fc_dim 256, CIFAR
      inputs).
    num_params_cifar: parameters with 32x32 inputs, including modules that
      do not reach the logits (as the original counts).
    num_params_imagenet: the same with 224x224 inputs.
  """

  config: NetConfig
  num_params_cifar: int
  num_params_imagenet: int


def sample_architectures(
  split: str,
  num: int,
  rng: np.random.Generator,
  rejections: collections.Counter | None = None,
) -> Iterator[Architecture]:
  """Yield `num` accepted architectures of a split.

  Args:
    split: one of `SPLITS`.
    num: number of architectures to yield.
    rng: the random generator (consumed).
    rejections: if given, counts the rejected candidates by reason.

  Yields:
    Architectures at generator width.

  Raises:
    ValueError: if `split` is unknown.
  """
  settings = split_settings(split)
  accepted = 0
  while accepted < num:
    config, reason = _sample_candidate(rng, settings)
    if config is None:
      if rejections is not None:
        rejections[reason] += 1
      continue
    accepted += 1
    yield Architecture(
      config,
      plan_lib.count_params(config, include_dead=True),
      plan_lib.count_params(
        config.replace(imagenet_input=True), include_dead=True
      ),
    )


def split_rng(split: str, seed: int, shard: int = 0) -> np.random.Generator:
  """Return the random generator of one shard of a split.

  Test and wide share their stream, so the wide split contains the test
  architectures.
  """
  stream = split_settings(split).stream
  return np.random.default_rng([seed, stream, shard])


# Training-time widths (the original's training loader): channels 32..128 in
# steps of 16, fc_dim 64..512 in steps of 64.
TRAIN_CHANNELS = tuple(range(32, 129, 16))
TRAIN_FC_DIMS = tuple(range(64, 513, 64))
# Number of leading choices of each size class.
_DEFAULT_FC_CHOICES = 4
_SMALL_CHANNEL_CHOICES = 2
_MEDIUM_CHANNEL_CHOICES = 3
# Parameter thresholds (at generator width) and cell counts of the classes.
_LARGE_PARAMS = 800_000
_MEDIUM_PARAMS = 400_000
_SMALL_PARAMS = 200_000
_LARGE_CELLS = 12
_MEDIUM_CELLS = 10
_SMALL_CELLS = 8
# fc_dim may exceed 256 only for networks of at most this many channels.
_WIDE_FC_MAX_CHANNELS = 64


def sample_training_width(
  config: NetConfig, num_params: int, rng: np.random.Generator
) -> tuple[int, int]:
  """Draw (channels, fc_dim) for one training use of a network.

  Larger networks get fewer channels, as in the original's training
  loader. A network gets 32 channels when it has over 0.8M parameters at
  generator width, a flattening head, a 5x5/7x7 conv or over 12 cells. It
  gets up to 48 channels over 0.4M parameters or 10 cells, up to 64 over
  0.2M or 8 cells, and up to 128 otherwise. fc_dim is 64..256, or 64..512
  for unrestricted networks that drew at most 64 channels.

  Args:
    config: the network.
    num_params: its parameter count at generator width (including modules
      that do not reach the logits).
    rng: the random generator.

  Returns:
    (channels, fc_dim).
  """
  fc_dim = rng.choice(TRAIN_FC_DIMS[:_DEFAULT_FC_CHOICES])
  large_conv = any(config.genotype.has_op(op) for op in LARGE_CONVS)
  cells = config.num_cells
  if (
    num_params > _LARGE_PARAMS
    or not config.global_pooling
    or large_conv
    or cells > _LARGE_CELLS
  ):
    channels = TRAIN_CHANNELS[0]
  elif num_params > _MEDIUM_PARAMS or cells > _MEDIUM_CELLS:
    channels = rng.choice(TRAIN_CHANNELS[:_SMALL_CHANNEL_CHOICES])
  elif num_params > _SMALL_PARAMS or cells > _SMALL_CELLS:
    channels = rng.choice(TRAIN_CHANNELS[:_MEDIUM_CHANNEL_CHOICES])
  else:
    channels = rng.choice(TRAIN_CHANNELS)
    if channels <= _WIDE_FC_MAX_CHANNELS:
      fc_dim = rng.choice(TRAIN_FC_DIMS)
  return int(channels), int(fc_dim)


def eval_width(split: str, config: NetConfig) -> NetConfig:
  """Return the network of an evaluation split at its evaluation width.

  Wide-split networks get 4x channels (2x with ImageNet inputs); the others
  keep their generator width.
  """
  split_settings(split)  # Raises on an unknown split.
  if split != "wide":
    return config
  factor = WIDE_FACTOR_IMAGENET if config.imagenet_input else WIDE_FACTOR_CIFAR
  return config.replace(channels=config.channels * factor)


def predefined_configs(imagenet_input: bool = False) -> dict[str, NetConfig]:
  """Networks of the predefined split built from genotypes.

  ViT: the ViT-style network of the original's `examples/vit.py` (128
  channels, 12 cells). DARTS: the DARTS network of `examples/darts.py`
  (36 channels and 20 cells for CIFAR, 48 and 14 with the DARTS stem for
  ImageNet). ResNet-50, the original's other predefined network, is not a
  DeepNets-1M network.
  """
  num_classes = 1000 if imagenet_input else 10
  vit = NetConfig(
    genotype=genotypes_lib.VIT,
    channels=128,
    num_classes=num_classes,
    num_cells=12,
    imagenet_input=imagenet_input,
    preprocess=False,
    channel_multiplier=1,
    global_pooling=True,
  )
  darts = NetConfig(
    genotype=genotypes_lib.DARTS,
    channels=48 if imagenet_input else 36,
    num_classes=num_classes,
    num_cells=14 if imagenet_input else 20,
    stem_type=int(imagenet_input),
    imagenet_input=imagenet_input,
  )
  return {"ViT": vit, "DARTS": darts}
