"""Evaluation of predicted parameters against random initialisation and SGD.

Follows the evaluation protocol of GHN-2 (Knyazev et al., "Parameter
Prediction for Unseen Deep Architectures", NeurIPS 2021, and ppuda's
`experiments/eval_ghn.py`). The GHN predicts all parameters of a network
once, and the network is scored by top-1 accuracy on the test images, with
every batch-norm layer normalising with the statistics of the current test
batch of 64 images. The same networks are scored with random fan-in
initialisation and after k steps of SGD from random initialisation. One GHN
forward pass is then worth an equivalent number of SGD steps (the paper
reports about 2,500 on CIFAR-10).

The networks, the GHN and the data come in through small interfaces
(`EvalNet`, a `PredictFn`, `ImageData`), so the same code evaluates
DeepNets-1M networks, the predefined model zoo and tiny test networks.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ghn_jax.graph import Graph

Params = Any
BatchStats = Any
# apply_fn(params, images, batch_stats) -> logits. `batch_stats=None` means
# that every batch-norm layer normalises with the current batch's statistics.
ApplyFn = Callable[[Params, jax.Array, BatchStats], jax.Array]
# collect_fn(params, images) -> the per-layer (mean, var) of this batch.
CollectBatchStatsFn = Callable[[Params, jax.Array], BatchStats]
# predict_fn(graph, params_template) -> predicted params (same structure).
PredictFn = Callable[[Graph, Params], Params]

# Test images per batch; batch-norm statistics come from each test batch, as
# in the GHN-2 evaluation (ppuda `--test_batch_size`, default 64).
TEST_BATCH_SIZE = 64

# SGD recipe of the original for training DeepNets-1M networks on CIFAR-10
# (ppuda `experiments/sgd/train_net.py` with the defaults of
# `ppuda/config.py`): batch 96, SGD with momentum 0.9, learning rate 0.025
# with cosine annealing, weight decay 3e-4, gradient norm clipped to 5.
SGD_BATCH_SIZE = 96
SGD_LEARNING_RATE = 0.025
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 3e-4
SGD_GRAD_CLIP_NORM = 5.0

# Name of the positional-encoding leaf in DeepNets-1M ViT-style networks.
POS_ENC_LEAF = "embedding"

# SGD steps that one forward pass of GHN-2 is worth on CIFAR-10.
# NOTE: a figure quoted from the GHN-2 paper, not re-derived here.
PAPER_SGD_EQUIVALENT_STEPS = 2500


@dataclasses.dataclass(frozen=True)
class ImageData:
  """Images in NHWC float32, already normalised, and integer labels.

  Attributes:
    images: float32 (N, H, W, C).
    labels: int32 (N,).
    name: dataset name shown in reports (e.g. 'fashion_mnist').
    num_classes: number of classes.
  """

  images: np.ndarray
  labels: np.ndarray
  name: str
  num_classes: int

  def __post_init__(self):
    if self.images.ndim != 4:
      raise ValueError(
        f"images must be NHWC (4-D), got shape {self.images.shape}."
      )
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
        f"labels shape {self.labels.shape} does not match "
        f"{self.images.shape[0]} images."
      )

  @property
  def image_size(self) -> int:
    return int(self.images.shape[1])

  def __len__(self) -> int:
    return int(self.images.shape[0])


# train_batches_fn(batch_size, seed) -> endless iterator of shuffled and
# augmented (images, labels) training batches.
TrainBatchesFn = Callable[[int, int], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class EvalData:
  """The images an evaluation needs.

  Attributes:
    test: test images; accuracies are measured on all of them.
    calibration: training images without augmentation, for batch-norm
      calibration; None disables calibration.
    train_batches_fn: source of training batches for the SGD baseline and
      fine-tuning; None disables them.
  """

  test: ImageData
  calibration: ImageData | None = None
  train_batches_fn: TrainBatchesFn | None = None

  @property
  def name(self) -> str:
    return self.test.name


@dataclasses.dataclass(frozen=True)
class EvalNet:
  """A network to evaluate: its graph, parameter template and apply function.

  Attributes:
    name: unique name, e.g. 'test/3' or 'resnet18'.
    split: DeepNets-1M split ('val', 'test', ...) or 'predefined'.
    graph: computational graph the GHN reads; None if it cannot be built.
    params: parameter pytree of the network (its values are only used as a
      template of shapes and dtypes).
    apply_fn: `apply_fn(params, images, batch_stats) -> logits`.
    collect_batch_stats_fn: returns this batch's per-layer batch-norm
      (mean, var); None if the network cannot calibrate running statistics.
    has_batch_norm: whether any layer normalises with batch statistics.
  """

  name: str
  split: str
  graph: Graph | None
  params: Params
  apply_fn: ApplyFn
  collect_batch_stats_fn: CollectBatchStatsFn | None = None
  has_batch_norm: bool = True

  @property
  def num_params(self) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params)))


@dataclasses.dataclass(frozen=True)
class SgdConfig:
  """SGD baseline and fine-tuning settings (defaults: the original's recipe).

  Attributes:
    eval_steps: steps after which the test accuracy is recorded; training
      runs max(eval_steps) steps with one cosine schedule over all of them.
    batch_size: training images per step.
    learning_rate: initial learning rate of the cosine schedule.
    momentum: SGD momentum.
    weight_decay: L2 weight decay added to the gradient (as PyTorch's SGD).
    grad_clip_norm: maximum global gradient norm.
    seed: seed of the training image order and augmentation.
  """

  eval_steps: tuple[int, ...] = (1, 10, 100, 1000)
  batch_size: int = SGD_BATCH_SIZE
  learning_rate: float = SGD_LEARNING_RATE
  momentum: float = SGD_MOMENTUM
  weight_decay: float = SGD_WEIGHT_DECAY
  grad_clip_norm: float = SGD_GRAD_CLIP_NORM
  seed: int = 0

  def __post_init__(self):
    if not self.eval_steps or min(self.eval_steps) < 1:
      raise ValueError(
        f"eval_steps must be positive step counts, got {self.eval_steps}."
      )
    if list(self.eval_steps) != sorted(set(self.eval_steps)):
      raise ValueError(
        f"eval_steps must be strictly increasing, got {self.eval_steps}."
      )

  @property
  def num_steps(self) -> int:
    return int(max(self.eval_steps))


# ---------------------------------------------------------------------------
# Accuracy.


def iterate_batches(
  data: ImageData, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield consecutive (images, labels) batches; the last one may be smaller."""
  for start in range(0, len(data), batch_size):
    stop = start + batch_size
    yield data.images[start:stop], data.labels[start:stop]


def top1_accuracy(
  apply_fn: ApplyFn,
  params: Params,
  data: ImageData,
  batch_stats: BatchStats = None,
  batch_size: int = TEST_BATCH_SIZE,
) -> float:
  """Compute top-1 accuracy over `data`, in batches of `batch_size`.

  With `batch_stats=None` batch norm uses each test batch's statistics, so
  the result depends on the batch size (the GHN-2 protocol uses 64).

  Args:
    apply_fn: network function, ideally jitted.
    params: network parameters.
    data: test images and labels.
    batch_stats: calibrated running statistics, or None.
    batch_size: test images per batch.

  Returns:
    Fraction of correctly classified images, in [0, 1].

  Raises:
    ValueError: if `data` is empty.
  """
  if len(data) == 0:
    raise ValueError("The test set is empty; pass at least one image.")
  num_correct = 0
  for images, labels in iterate_batches(data, batch_size):
    logits = apply_fn(params, jnp.asarray(images), batch_stats)
    predictions = np.asarray(jnp.argmax(logits, axis=-1))
    num_correct += int(np.sum(predictions == labels))
  return num_correct / len(data)


def calibrate_batch_stats(
  collect_fn: CollectBatchStatsFn,
  params: Params,
  data: ImageData,
  num_batches: int,
  batch_size: int = TEST_BATCH_SIZE,
) -> BatchStats:
  """Average per-layer batch-norm statistics over `num_batches` batches.

  This is PyTorch's cumulative moving average (`momentum=None`) after a
  reset of the running statistics: each batch counts equally.

  Args:
    collect_fn: returns one batch's per-layer (mean, var) pytree.
    params: network parameters.
    data: training images (their order is the caller's choice).
    num_batches: number of batches to average, >= 1.
    batch_size: images per batch.

  Returns:
    The averaged statistics, in the structure `collect_fn` returns.

  Raises:
    ValueError: if `num_batches` < 1 or `data` has fewer images than one
      batch.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
  if len(data) < batch_size:
    raise ValueError(
      f"Calibration needs at least one full batch of {batch_size} images, "
      f"got {len(data)}."
    )
  total = None
  count = 0
  for images, _ in iterate_batches(data, batch_size):
    if count == num_batches or images.shape[0] < batch_size:
      break
    stats = collect_fn(params, jnp.asarray(images))
    total = (
      stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    )
    count += 1
  if count < num_batches:
    logging.warning(
      "Calibrated batch norm on %d batches of %d images, not %d: the "
      "calibration set has only %d images.",
      count,
      batch_size,
      num_batches,
      len(data),
    )
  return jax.tree_util.tree_map(lambda x: x / count, total)


# ---------------------------------------------------------------------------
# Random initialisation.


def _fan_in(shape: Sequence[int]) -> int:
  """Fan-in of a Flax kernel: all axes but the last (HWIO conv, (in, out))."""
  return int(np.prod(shape[:-1]))


def random_init_params(params: Params, rng: jax.Array) -> Params:
  """Draw PyTorch-default (fan-in) random values for a Flax params pytree.

  Kernels (2-D and more, Flax layout with outputs last) are drawn from
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for `nn.Conv2d` and
  `nn.Linear` (kaiming-uniform with a=sqrt(5)), with which the original's
  PyTorch networks start. A 1-D bias next to a kernel is drawn
  from the same range. Norm-layer scales are 1, positional encodings
  (leaves named 'embedding') are drawn from N(0, 1), and other 1-D leaves
  are 0.

  Args:
    params: pytree of arrays (a nested dict as Flax makes).
    rng: random key.

  Returns:
    A pytree of the same structure, shapes and dtypes.
  """
  flat = _flatten_dict(params)
  keys = jax.random.split(rng, max(len(flat), 1))
  fan_in_of_module = {
    path.rpartition("/")[0]: _fan_in(np.shape(value))
    for path, value in flat.items()
    if np.ndim(value) >= 2
  }
  new_flat = {}
  for key, (path, value) in zip(keys, sorted(flat.items()), strict=False):
    shape, dtype = np.shape(value), jnp.asarray(value).dtype
    module, _, leaf = path.rpartition("/")
    if len(shape) >= 2 and leaf != POS_ENC_LEAF:
      bound = 1.0 / math.sqrt(max(_fan_in(shape), 1))
    elif leaf == "scale":
      new_flat[path] = jnp.ones(shape, dtype)
      continue
    elif leaf == POS_ENC_LEAF:
      new_flat[path] = jax.random.normal(key, shape, dtype)
      continue
    elif leaf == "bias" and module in fan_in_of_module:
      bound = 1.0 / math.sqrt(max(fan_in_of_module[module], 1))
    else:
      new_flat[path] = jnp.zeros(shape, dtype)
      continue
    new_flat[path] = jax.random.uniform(key, shape, dtype, -bound, bound)
  return _unflatten_like(params, new_flat)


def _flatten_dict(tree: Params, prefix: str = "") -> dict[str, Any]:
  """Flatten nested mappings to {'a/b/c': leaf}."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    flat.update(_flatten_dict(value, path))
  return flat


def _unflatten_like(template: Params, flat: Mapping[str, Any]) -> Params:
  """Rebuild `template`'s nested dict structure from {'a/b/c': leaf}."""

  def build(tree, prefix):
    if not isinstance(tree, Mapping):
      return flat[prefix]
    return {
      key: build(value, f"{prefix}/{key}" if prefix else str(key))
      for key, value in tree.items()
    }

  return build(template, "")


# ---------------------------------------------------------------------------
# SGD.


def make_sgd_optimizer(config: SgdConfig) -> optax.GradientTransformation:
  """Build the original's SGD: clip, weight decay, momentum, cosine decay."""
  schedule = optax.cosine_decay_schedule(
    config.learning_rate, decay_steps=config.num_steps
  )
  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip_norm),
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  )


def make_train_step(
  apply_fn: ApplyFn, optimizer: optax.GradientTransformation
) -> Callable:
  """Build a jitted SGD step on the cross-entropy of `apply_fn`'s logits."""

  def loss_fn(params, images, labels):
    logits = apply_fn(params, images, None)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  @jax.jit
  def train_step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@dataclasses.dataclass(frozen=True)
class TrainingCurve:
  """Test accuracy recorded during SGD training.

  Attributes:
    steps: step counts at which accuracy was measured (0 = before training).
    top1: accuracy after each of those steps.
    losses: training loss of every step.
    seconds: wall-clock time of the whole run, compilation included.
  """

  steps: tuple[int, ...]
  top1: tuple[float, ...]
  losses: tuple[float, ...]
  seconds: float


def train_with_sgd(
  net: EvalNet,
  params: Params,
  train_batches: Iterator[tuple[np.ndarray, np.ndarray]],
  test_data: ImageData,
  config: SgdConfig,
  eval_apply_fn: ApplyFn | None = None,
  train_step: Callable | None = None,
) -> TrainingCurve:
  """Train `net` from `params` with SGD; record test accuracy at checkpoints.

  Args:
    net: network to train (its `apply_fn` is used with batch statistics).
    params: initial parameters (random or predicted).
    train_batches: endless iterator of (images, labels) training batches.
    test_data: test images for the accuracy checkpoints.
    config: SGD settings; accuracy is measured before training and after
      each step count in `config.eval_steps`.
    eval_apply_fn: jitted `net.apply_fn` to reuse for testing, if any.
    train_step: a step from `make_train_step(net.apply_fn,
      make_sgd_optimizer(config))` to reuse (and not compile again).

  Returns:
    The recorded curve.

  Raises:
    FloatingPointError: if the training loss becomes non-finite.
  """
  start = time.perf_counter()
  eval_apply_fn = eval_apply_fn or jax.jit(net.apply_fn)
  optimizer = make_sgd_optimizer(config)
  train_step = train_step or make_train_step(net.apply_fn, optimizer)
  opt_state = optimizer.init(params)

  steps, top1, losses = (
    [0],
    [top1_accuracy(eval_apply_fn, params, test_data)],
    [],
  )
  for step in range(1, config.num_steps + 1):
    images, labels = next(train_batches)
    params, opt_state, loss = train_step(
      params, opt_state, jnp.asarray(images), jnp.asarray(labels)
    )
    loss = float(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(
        f"SGD loss of {net.name} became {loss} at step {step}; lower the "
        "learning rate (--sgd-lr)."
      )
    losses.append(loss)
    if step in config.eval_steps:
      steps.append(step)
      top1.append(top1_accuracy(eval_apply_fn, params, test_data))
  return TrainingCurve(
    steps=tuple(steps),
    top1=tuple(top1),
    losses=tuple(losses),
    seconds=time.perf_counter() - start,
  )


# ---------------------------------------------------------------------------
# SGD equivalence.


@dataclasses.dataclass(frozen=True)
class SgdEquivalence:
  """SGD steps from random initialisation that match a given accuracy.

  Attributes:
    steps: the (log-interpolated) number of steps.
    relation: '=' when the accuracy lies within the measured curve; '<' when
      it is below the accuracy after the first measured step count (so the
      equivalent is fewer steps than `steps`); '>' when it exceeds the
      accuracy after the last one (more steps than `steps`).
  """

  steps: float
  relation: str

  def __str__(self) -> str:
    prefix = "" if self.relation == "=" else self.relation + " "
    return f"{prefix}{self.steps:,.0f}"


def sgd_steps_equivalent(
  accuracy: float, steps: Sequence[int], curve: Sequence[float]
) -> SgdEquivalence:
  """Find how many SGD steps reach `accuracy`, interpolating in log-steps.

  The first step count whose accuracy reaches `accuracy` and its predecessor
  bracket the result. Between them, accuracy is taken to be linear in
  log10(steps).

  Args:
    accuracy: accuracy to match (e.g. the GHN's).
    steps: increasing positive step counts.
    curve: accuracy after each of `steps`.

  Returns:
    The equivalent number of steps and whether it is exact or a bound.

  Raises:
    ValueError: if the inputs are empty, of different lengths, or the steps
      are not increasing positive integers.
  """
  if len(steps) == 0 or len(steps) != len(curve):
    raise ValueError(
      f"steps and curve must be non-empty and of equal length, got "
      f"{len(steps)} and {len(curve)}."
    )
  if min(steps) < 1 or any(
    b <= a for a, b in zip(steps, steps[1:], strict=False)
  ):
    raise ValueError(
      f"steps must be increasing positive integers, got {list(steps)}."
    )
  if accuracy <= curve[0]:
    return SgdEquivalence(float(steps[0]), "<" if accuracy < curve[0] else "=")
  for i in range(1, len(steps)):
    if curve[i] >= accuracy:
      fraction = (accuracy - curve[i - 1]) / (curve[i] - curve[i - 1])
      log_lo, log_hi = math.log10(steps[i - 1]), math.log10(steps[i])
      return SgdEquivalence(10 ** (log_lo + fraction * (log_hi - log_lo)), "=")
  return SgdEquivalence(float(steps[-1]), ">")


# ---------------------------------------------------------------------------
# Summaries.


def summarize(values: Sequence[float]) -> dict[str, float]:
  """Return count, mean, standard deviation and standard error of `values`.

  NaN values (e.g. networks without batch norm under calibration) are left
  out. The standard deviation is the sample one (ddof=1); with one value
  it is 0.
  """
  finite = np.asarray([v for v in values if v is not None and np.isfinite(v)])
  count = int(finite.size)
  if count == 0:
    return {"n": 0, "mean": float("nan"), "std": float("nan"), "se": 0.0}
  std = float(np.std(finite, ddof=1)) if count > 1 else 0.0
  return {
    "n": count,
    "mean": float(np.mean(finite)),
    "std": std,
    "se": std / math.sqrt(count),
  }


def block_until_ready(tree: Params) -> Params:
  """Wait for every array in `tree` to be computed."""
  return jax.tree_util.tree_map(
    lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x,
    tree,
  )


def time_prediction(
  predict_fn: PredictFn, graph: Graph, params: Params, repeats: int = 1
) -> tuple[Params, float, float]:
  """Predict parameters and time it: first call and median of warm calls.

  Args:
    predict_fn: the GHN's prediction function.
    graph: the network's graph.
    params: parameter template.
    repeats: warm calls to time after the first one (0 to skip).

  Returns:
    (predicted params, seconds of the first call, median seconds of the
    warm calls or NaN when `repeats` is 0). The first call includes any
    compilation.
  """
  start = time.perf_counter()
  predicted = block_until_ready(predict_fn(graph, params))
  first = time.perf_counter() - start
  warm = []
  for _ in range(repeats):
    start = time.perf_counter()
    block_until_ready(predict_fn(graph, params))
    warm.append(time.perf_counter() - start)
  return predicted, first, float(np.median(warm)) if warm else float("nan")


def check_params_match(name: str, template: Params, predicted: Params) -> None:
  """Raise ValueError if `predicted` differs from `template` in shapes."""
  expected = jax.tree_util.tree_map(np.shape, template)
  actual = jax.tree_util.tree_map(np.shape, predicted)
  if expected != actual:
    raise ValueError(
      f"Predicted parameters of {name} do not match its parameter shapes: "
      f"expected {expected}, got {actual}."
    )


# ---------------------------------------------------------------------------
# The whole evaluation.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Measurements made on every network.

  Attributes:
    bn_calibrate: training batches (of 64) to calibrate running batch-norm
      statistics on, for a second accuracy; 0 disables it.
    sgd: SGD baseline settings; None disables the baseline.
    sgd_num_nets: networks that get the SGD baseline (the smallest ones by
      parameter count); 0 for all.
    prediction_repeats: warm calls timed after the first prediction.
    seed: seed of the random initialisation baseline.
  """

  bn_calibrate: int = 0
  sgd: SgdConfig | None = None
  sgd_num_nets: int = 2
  prediction_repeats: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.bn_calibrate < 0:
      raise ValueError(
        f"bn_calibrate must be >= 0 batches, got {self.bn_calibrate}."
      )
    if self.sgd_num_nets < 0:
      raise ValueError(f"sgd_num_nets must be >= 0, got {self.sgd_num_nets}.")


def select_for_sgd(num_params: Sequence[int], num_selected: int) -> list[int]:
  """Return the indices of the `num_selected` smallest networks, in order.

  SGD costs roughly in proportion to a network's size, so the smallest
  networks keep the baseline affordable on a CPU. Ties go to the earlier
  network; `num_selected` = 0 selects all.
  """
  if num_selected == 0 or num_selected >= len(num_params):
    return list(range(len(num_params)))
  by_size = sorted(range(len(num_params)), key=lambda i: (num_params[i], i))
  return sorted(by_size[:num_selected])


def _score(
  net: EvalNet,
  eval_apply_fn: ApplyFn,
  collect_fn: CollectBatchStatsFn | None,
  params: Params,
  data: EvalData,
  bn_calibrate: int,
) -> dict[str, float]:
  """Score `params` with batch statistics and, if asked, calibrated ones."""
  scores = {"top1": top1_accuracy(eval_apply_fn, params, data.test)}
  if not bn_calibrate:
    return scores
  if not net.has_batch_norm:
    scores["top1_calibrated"] = scores["top1"]
  elif collect_fn is None or data.calibration is None:
    scores["top1_calibrated"] = float("nan")
  else:
    stats = calibrate_batch_stats(
      collect_fn, params, data.calibration, bn_calibrate
    )
    scores["top1_calibrated"] = top1_accuracy(
      eval_apply_fn, params, data.test, stats
    )
  return scores


def evaluate_network(
  net: EvalNet,
  predict_fn: PredictFn | None,
  data: EvalData,
  config: EvalConfig,
) -> dict[str, Any]:
  """Evaluate one network: GHN prediction and random initialisation.

  Args:
    net: the network.
    predict_fn: the GHN's prediction function; None to skip the GHN.
    data: test images, and training images for calibration and SGD.
    config: what to measure (`config.sgd` is not used here, see
      `run_sgd_baseline`).

  Returns:
    A JSON-ready dict with the network's name, split, sizes, timings and
    accuracies.

  Raises:
    ValueError: if the network has no graph or the prediction does not
      match its parameter shapes.
  """
  eval_apply_fn = jax.jit(net.apply_fn)
  collect_fn = None
  if net.collect_batch_stats_fn is not None:
    collect_fn = jax.jit(net.collect_batch_stats_fn)
  record: dict[str, Any] = {
    "name": net.name,
    "split": net.split,
    "num_params": net.num_params,
    "num_nodes": net.graph.num_nodes if net.graph is not None else None,
    "has_batch_norm": net.has_batch_norm,
  }

  if predict_fn is not None:
    if net.graph is None:
      raise ValueError(f"Network {net.name} has no graph to predict from.")
    predicted, first_s, warm_s = time_prediction(
      predict_fn, net.graph, net.params, config.prediction_repeats
    )
    check_params_match(net.name, net.params, predicted)
    record["predict_seconds_first"] = first_s
    record["predict_seconds"] = warm_s
    record["ghn"] = _score(
      net, eval_apply_fn, collect_fn, predicted, data, config.bn_calibrate
    )

  random_params = _random_params(net, config.seed)
  record["random"] = _score(
    net, eval_apply_fn, collect_fn, random_params, data, config.bn_calibrate
  )
  return record


def _random_params(net: EvalNet, seed: int) -> Params:
  """Draw the random initialisation of `net`, fixed by seed and name."""
  rng = jax.random.fold_in(jax.random.key(seed), _stable_hash(net.name))
  return random_init_params(net.params, rng)


def run_sgd_baseline(
  net: EvalNet,
  data: EvalData,
  config: SgdConfig,
  seed: int = 0,
  ghn_top1: float | None = None,
) -> dict[str, Any]:
  """Train `net` with SGD from its random initialisation; compare the GHN.

  Args:
    net: the network.
    data: test images and a training batch source.
    config: SGD settings.
    seed: seed of the random initialisation (as in `evaluate_network`, so
      step 0 is the random-initialisation score).
    ghn_top1: the GHN's accuracy on this network, if any.

  Returns:
    A JSON-ready dict: the curve, and the SGD steps the GHN is worth.

  Raises:
    ValueError: if `data` has no training batches.
  """
  if data.train_batches_fn is None:
    raise ValueError("The SGD baseline needs training images.")
  batches = data.train_batches_fn(config.batch_size, config.seed)
  curve = train_with_sgd(
    net, _random_params(net, seed), batches, data.test, config
  )
  result = {
    "steps": list(curve.steps),
    "top1": list(curve.top1),
    "final_loss": curve.losses[-1],
    "seconds": curve.seconds,
  }
  if ghn_top1 is not None:
    equivalent = sgd_steps_equivalent(ghn_top1, curve.steps[1:], curve.top1[1:])
    result["ghn_equivalent_steps"] = equivalent.steps
    result["ghn_equivalent_relation"] = equivalent.relation
  return result


def _stable_hash(text: str) -> int:
  """Hash a string to a 31-bit integer, the same on every run and machine."""
  return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Aggregate per-network records per split and over SGD-trained networks.

  Args:
    records: outputs of `evaluate_network`.

  Returns:
    {'splits': {split: {metric: summary}}, 'sgd': {...}} where each summary
    is `summarize`'s dict. 'sgd' contains the mean curve over the networks
    trained with SGD, the mean GHN accuracy on the same networks, and the
    SGD steps that accuracy is worth on the mean curve.
  """
  splits: dict[str, dict[str, Any]] = {}
  for split in dict.fromkeys(r["split"] for r in records):
    group = [r for r in records if r["split"] == split]
    summary = {}
    for source in ("ghn", "random"):
      for metric in ("top1", "top1_calibrated"):
        values = [
          r[source][metric] for r in group if metric in r.get(source, {})
        ]
        if values:
          summary[f"{source}_{metric}"] = summarize(values)
    times = [r["predict_seconds"] for r in group if "predict_seconds" in r]
    if times:
      summary["predict_seconds"] = summarize(times)
    summary["num_params"] = summarize([r["num_params"] for r in group])
    splits[split] = summary

  trained = [r for r in records if "sgd" in r]
  sgd: dict[str, Any] = {"num_nets": len(trained)}
  if trained:
    steps = trained[0]["sgd"]["steps"]
    curves = np.asarray([r["sgd"]["top1"] for r in trained])
    sgd["steps"] = steps
    sgd["mean_top1"] = curves.mean(axis=0).tolist()
    if all("ghn" in r for r in trained):
      ghn_mean = float(np.mean([r["ghn"]["top1"] for r in trained]))
      equivalent = sgd_steps_equivalent(
        ghn_mean, steps[1:], sgd["mean_top1"][1:]
      )
      sgd["ghn_mean_top1"] = ghn_mean
      sgd["ghn_equivalent_steps"] = equivalent.steps
      sgd["ghn_equivalent_relation"] = equivalent.relation
  return {"splits": splits, "sgd": sgd}


def evaluate_networks(
  nets: Sequence[EvalNet | Callable[[], EvalNet]],
  predict_fn: PredictFn | None,
  data: EvalData,
  config: EvalConfig,
  meta: Mapping[str, Any] | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Evaluate every network and summarise per split.

  Args:
    nets: networks, or functions that build them. Builders are called one
      at a time, so only one network is in memory. Those trained with SGD
      are built a second time, after all networks have been scored.
    predict_fn: the GHN's prediction function; None to skip the GHN.
    data: test images, and training images for calibration and SGD.
    config: what to measure.
    meta: settings to store under 'meta' in the results (dataset, machine,
      checkpoint...); the test-set size and batch sizes are added.
    progress: show a tqdm progress bar over networks.

  Returns:
    {'meta': ..., 'networks': [per-network records], 'summary': per-split
    and SGD summaries}, ready for `json.dump`.
  """
  from tqdm import tqdm  # noqa: PLC0415 (only the evaluation needs it)

  records = []
  bar = tqdm(nets, desc="networks", unit="net", disable=not progress)
  for item in bar:
    net = item if isinstance(item, EvalNet) else item()
    bar.set_postfix_str(f"{net.name} ({net.num_params:,} params)")
    start = time.perf_counter()
    record = evaluate_network(net, predict_fn, data, config)
    record["seconds"] = time.perf_counter() - start
    logging.info(
      "%s: GHN top-1 %s, random top-1 %.4f (%.1f s)",
      net.name,
      f"{record['ghn']['top1']:.4f}" if "ghn" in record else "-",
      record["random"]["top1"],
      record["seconds"],
    )
    records.append(record)

  if config.sgd is not None and data.train_batches_fn is not None:
    selected = select_for_sgd(
      [r["num_params"] for r in records], config.sgd_num_nets
    )
    bar = tqdm(selected, desc="SGD baseline", unit="net", disable=not progress)
    for i in bar:
      net = nets[i] if isinstance(nets[i], EvalNet) else nets[i]()
      bar.set_postfix_str(net.name)
      ghn_top1 = records[i]["ghn"]["top1"] if "ghn" in records[i] else None
      records[i]["sgd"] = run_sgd_baseline(
        net, data, config.sgd, config.seed, ghn_top1
      )

  full_meta = dict(meta or {})
  full_meta.update(
    dataset=data.name,
    num_classes=data.test.num_classes,
    image_size=data.test.image_size,
    test_images=len(data.test),
    test_batch_size=TEST_BATCH_SIZE,
    bn_calibrate=config.bn_calibrate,
    random_init_seed=config.seed,
  )
  if config.sgd is not None:
    full_meta["sgd"] = dataclasses.asdict(config.sgd)
  return {
    "meta": full_meta,
    "networks": records,
    "summary": summarize_records(records),
  }


# ---------------------------------------------------------------------------
# Fine-tuning.

FINETUNE_GHN_LABEL = "GHN prediction"
FINETUNE_RANDOM_LABEL = "random init"


def compare_finetuning(
  net: EvalNet,
  predict_fn: PredictFn,
  data: EvalData,
  config: SgdConfig,
  seed: int = 0,
) -> dict[str, TrainingCurve]:
  """Train `net` from predicted and from random parameters, same recipe.

  Both runs see the same training batches (same `config.seed`) and are
  scored on the same test images before training and after each step
  count of `config.eval_steps`.

  Args:
    net: the network.
    predict_fn: the GHN's prediction function.
    data: test images and a training batch source.
    config: SGD settings.
    seed: seed of the random initialisation.

  Returns:
    {FINETUNE_GHN_LABEL: curve, FINETUNE_RANDOM_LABEL: curve}.

  Raises:
    ValueError: if `data` has no training batches or the network no graph.
  """
  if data.train_batches_fn is None:
    raise ValueError("Fine-tuning needs training images (train_batches_fn).")
  if net.graph is None:
    raise ValueError(f"Network {net.name} has no graph to predict from.")
  predicted = predict_fn(net.graph, net.params)
  check_params_match(net.name, net.params, predicted)
  rng = jax.random.fold_in(jax.random.key(seed), _stable_hash(net.name))
  starts = {
    FINETUNE_GHN_LABEL: predicted,
    FINETUNE_RANDOM_LABEL: random_init_params(net.params, rng),
  }
  eval_apply_fn = jax.jit(net.apply_fn)
  train_step = make_train_step(net.apply_fn, make_sgd_optimizer(config))
  curves = {}
  for label, params in starts.items():
    logging.info("Fine-tuning %s from %s.", net.name, label)
    batches = data.train_batches_fn(config.batch_size, config.seed)
    curves[label] = train_with_sgd(
      net, params, batches, data.test, config, eval_apply_fn, train_step
    )
  return curves
