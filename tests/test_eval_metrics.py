"""Tests of the evaluation metrics: accuracy, calibration, SGD, equivalence."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

from ghn_jax import evaluate, nn_ops, plots
from ghn_jax.eval import batch_norm


class TinyConvNet(nn.Module):
  """conv 3x3 -> batch norm -> relu -> global pool -> dense, via nn_ops."""

  features: int = 4
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 4)
    )
    x = nn_ops.conv2d(x, kernel, padding=((1, 1), (1, 1)))
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x = nn_ops.relu(nn_ops.batch_norm(x, scale, bias))
    x = nn_ops.global_avg_pool(x)
    head = nn.Dense(self.num_classes, name="classifier")
    return head(x)


def _tiny_net() -> evaluate.EvalNet:
  model = TinyConvNet()
  params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))["params"]
  apply_fn, collect_fn = batch_norm.make_batch_stats_fns(
    lambda p, x: model.apply({"params": p}, x)
  )
  return evaluate.EvalNet(
    name="tiny",
    split="test",
    graph=None,
    params=params,
    apply_fn=apply_fn,
    collect_batch_stats_fn=collect_fn,
  )


def _images(num, seed=0, num_classes=3):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num).astype(np.int32)
  # Class-dependent brightness makes the task learnable in a few steps.
  images = rng.normal(size=(num, 8, 8, 3)).astype(np.float32)
  images += labels[:, None, None, None].astype(np.float32)
  return evaluate.ImageData(images, labels, "synthetic", num_classes)


# --- SGD equivalence -------------------------------------------------------


def test_equivalence_interpolates_in_log_steps():
  steps, curve = (1, 10, 100, 1000), (0.1, 0.2, 0.4, 0.6)
  result = evaluate.sgd_steps_equivalent(0.3, steps, curve)
  assert result.relation == "="
  assert math.isclose(result.steps, math.sqrt(10 * 100), rel_tol=1e-9)


def test_equivalence_exact_at_measured_point():
  result = evaluate.sgd_steps_equivalent(0.4, (1, 10, 100), (0.1, 0.2, 0.4))
  assert result.relation == "="
  assert math.isclose(result.steps, 100.0)


def test_equivalence_below_first_step():
  result = evaluate.sgd_steps_equivalent(0.05, (1, 10), (0.1, 0.2))
  assert result.relation == "<"
  assert result.steps == 1.0
  assert str(result) == "< 1"


def test_equivalence_above_last_step():
  result = evaluate.sgd_steps_equivalent(0.9, (1, 10, 100), (0.1, 0.2, 0.3))
  assert result.relation == ">"
  assert result.steps == 100.0


def test_equivalence_uses_first_crossing():
  # The curve dips after step 10; the first crossing (1 -> 10) counts.
  steps, curve = (1, 10, 100, 1000), (0.1, 0.5, 0.2, 0.7)
  result = evaluate.sgd_steps_equivalent(0.3, steps, curve)
  assert result.relation == "="
  assert 1 < result.steps < 10
  expected = 10 ** ((0.3 - 0.1) / (0.5 - 0.1))
  assert math.isclose(result.steps, expected, rel_tol=1e-9)


def test_equivalence_paper_like_curve():
  # Synthetic curve linear in log10(steps): 0.1 + 0.15 * log10(k).
  steps = (1, 10, 100, 1000, 10000)
  curve = tuple(0.1 + 0.15 * math.log10(k) for k in steps)
  accuracy = 0.1 + 0.15 * math.log10(2500)
  result = evaluate.sgd_steps_equivalent(accuracy, steps, curve)
  assert math.isclose(result.steps, 2500, rel_tol=1e-9)


@pytest.mark.parametrize(
  "steps, curve",
  [((), ()), ((1, 10), (0.1,)), ((10, 1), (0.1, 0.2)), ((0, 1), (0.1, 0.2))],
)
def test_equivalence_rejects_bad_curves(steps, curve):
  with pytest.raises(ValueError, match="steps"):
    evaluate.sgd_steps_equivalent(0.5, steps, curve)


# --- summaries and configs -------------------------------------------------


def test_summarize_mean_std_se():
  summary = evaluate.summarize([0.2, 0.4, float("nan"), 0.6])
  assert summary["n"] == 3
  assert math.isclose(summary["mean"], 0.4)
  assert math.isclose(summary["std"], 0.2)
  assert math.isclose(summary["se"], 0.2 / math.sqrt(3))


def test_summarize_single_and_empty():
  assert evaluate.summarize([0.5])["std"] == 0.0
  assert evaluate.summarize([])["n"] == 0


def test_select_for_sgd_takes_smallest():
  sizes = [500, 100, 300, 100, 900]
  assert evaluate.select_for_sgd(sizes, 1) == [1]
  assert evaluate.select_for_sgd(sizes, 2) == [1, 3]
  assert evaluate.select_for_sgd(sizes, 3) == [1, 2, 3]
  assert evaluate.select_for_sgd(sizes, 0) == [0, 1, 2, 3, 4]
  assert evaluate.select_for_sgd(sizes, 9) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("eval_steps", [(), (0, 1), (10, 1), (1, 1)])
def test_sgd_config_rejects_bad_steps(eval_steps):
  with pytest.raises(ValueError, match="eval_steps"):
    evaluate.SgdConfig(eval_steps=eval_steps)


def test_eval_config_rejects_negative_calibration():
  with pytest.raises(ValueError, match="bn_calibrate"):
    evaluate.EvalConfig(bn_calibrate=-1)


# --- random initialisation -------------------------------------------------


def test_random_init_fan_in_bounds():
  params = {
    "conv": {"kernel": jnp.zeros((3, 3, 8, 16)), "bias": jnp.zeros(16)},
    "norm": {"scale": jnp.zeros(16), "bias": jnp.ones(16)},
  }
  new = evaluate.random_init_params(params, jax.random.key(0))
  bound = 1 / math.sqrt(3 * 3 * 8)
  kernel = np.asarray(new["conv"]["kernel"])
  assert kernel.shape == (3, 3, 8, 16)
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.8 * bound
  assert np.abs(np.asarray(new["conv"]["bias"])).max() <= bound
  np.testing.assert_array_equal(new["norm"]["scale"], np.ones(16))
  np.testing.assert_array_equal(new["norm"]["bias"], np.zeros(16))


def test_random_init_is_deterministic():
  params = {"dense": {"kernel": jnp.zeros((5, 2))}}
  first = evaluate.random_init_params(params, jax.random.key(3))
  second = evaluate.random_init_params(params, jax.random.key(3))
  other = evaluate.random_init_params(params, jax.random.key(4))
  np.testing.assert_array_equal(
    first["dense"]["kernel"], second["dense"]["kernel"]
  )
  assert not np.array_equal(first["dense"]["kernel"], other["dense"]["kernel"])


# --- accuracy and calibration ----------------------------------------------


def test_top1_accuracy_counts_correct():
  # A "network" that predicts the class stored in the first pixel.
  data = evaluate.ImageData(
    np.zeros((5, 2, 2, 1), np.float32),
    np.array([0, 1, 1, 0, 1], np.int32),
    "synthetic",
    2,
  )
  data.images[:, 0, 0, 0] = [0, 1, 0, 0, 1]

  def apply_fn(params, images, batch_stats):
    del params, batch_stats
    return jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), 2)

  accuracy = evaluate.top1_accuracy(apply_fn, None, data, batch_size=2)
  assert accuracy == pytest.approx(4 / 5)


def test_top1_accuracy_empty_raises():
  empty = evaluate.ImageData(
    np.zeros((0, 2, 2, 1), np.float32), np.zeros(0, np.int32), "e", 2
  )
  with pytest.raises(ValueError, match="empty"):
    evaluate.top1_accuracy(lambda *a: None, None, empty)


def test_image_data_rejects_mismatched_labels():
  with pytest.raises(ValueError, match="labels"):
    evaluate.ImageData(np.zeros((3, 2, 2, 1)), np.zeros(2), "x", 2)


@pytest.mark.parametrize("use_jit", [False, True])
def test_batch_stats_collect_and_apply(use_jit):
  net = _tiny_net()
  images = jnp.asarray(_images(16).images)
  collect = (
    jax.jit(net.collect_batch_stats_fn)
    if use_jit
    else (net.collect_batch_stats_fn)
  )
  apply_fn = jax.jit(net.apply_fn) if use_jit else net.apply_fn
  stats = collect(net.params, images)
  assert len(stats) == 1
  mean, variance = stats[0]
  assert mean.shape == (4,)
  assert variance.shape == (4,)
  assert bool(jnp.all(variance >= 0))
  # With the batch's own statistics, "running" equals batch mode.
  np.testing.assert_allclose(
    apply_fn(net.params, images, stats),
    apply_fn(net.params, images, None),
    rtol=1e-4,
    atol=1e-5,
  )
  # Other statistics change the output.
  shifted = [(m + 1.0, v) for m, v in stats]
  assert not np.allclose(
    apply_fn(net.params, images, shifted), apply_fn(net.params, images, None)
  )


def test_calibrate_averages_batches():
  net = _tiny_net()
  data = _images(128)
  stats = evaluate.calibrate_batch_stats(
    net.collect_batch_stats_fn, net.params, data, num_batches=2
  )
  first = net.collect_batch_stats_fn(net.params, data.images[:64])
  second = net.collect_batch_stats_fn(net.params, data.images[64:])
  np.testing.assert_allclose(
    stats[0][0], (first[0][0] + second[0][0]) / 2, rtol=1e-5
  )


def test_calibrate_rejects_too_few_images():
  net = _tiny_net()
  with pytest.raises(ValueError, match="full batch"):
    evaluate.calibrate_batch_stats(
      net.collect_batch_stats_fn, net.params, _images(10), num_batches=1
    )
  with pytest.raises(ValueError, match="num_batches"):
    evaluate.calibrate_batch_stats(
      net.collect_batch_stats_fn, net.params, _images(64), num_batches=0
    )


def test_count_batch_norm_calls():
  net = _tiny_net()
  images = jnp.zeros((2, 8, 8, 3))
  count = batch_norm.count_batch_norm_calls(
    net.collect_batch_stats_fn, net.params, images
  )
  assert count == 1
  # The replacement is undone after tracing.
  assert nn_ops.batch_norm.__name__ == "batch_norm"


# --- SGD -------------------------------------------------------------------


def _batches(data, batch_size, seed):
  rng = np.random.default_rng(seed)
  while True:
    index = rng.choice(len(data), batch_size, replace=False)
    yield data.images[index], data.labels[index]


def test_train_with_sgd_records_curve_and_learns():
  net = _tiny_net()
  train, test = _images(256, seed=1), _images(128, seed=2)
  config = evaluate.SgdConfig(
    eval_steps=(1, 5, 30), batch_size=32, learning_rate=0.1
  )
  params = evaluate.random_init_params(net.params, jax.random.key(1))
  curve = evaluate.train_with_sgd(
    net, params, _batches(train, 32, 0), test, config
  )
  assert curve.steps == (0, 1, 5, 30)
  assert len(curve.top1) == 4
  assert len(curve.losses) == 30
  assert all(0.0 <= a <= 1.0 for a in curve.top1)
  assert np.mean(curve.losses[-5:]) < np.mean(curve.losses[:5])
  assert curve.top1[-1] > 0.5


def test_train_with_sgd_detects_non_finite_loss():
  net = _tiny_net()
  data = _images(64)
  config = evaluate.SgdConfig(eval_steps=(2,), batch_size=32)
  params = jax.tree_util.tree_map(lambda x: x * jnp.nan, net.params)
  with pytest.raises(FloatingPointError, match="tiny"):
    evaluate.train_with_sgd(net, params, _batches(data, 32, 0), data, config)


class TinyFlaxBatchNormNet(nn.Module):
  """conv -> flax.linen.BatchNorm -> pool -> dense, with a `train` flag."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(3, name="fc")(jnp.mean(nn.relu(x), axis=(1, 2)))


@pytest.mark.parametrize("use_jit", [False, True])
def test_flax_batch_norm_collect_and_apply(use_jit):
  model = TinyFlaxBatchNormNet()
  images = jnp.asarray(_images(16).images)
  variables = model.init(jax.random.key(0), images)
  apply_fn, collect_fn = batch_norm.make_flax_batch_norm_fns(
    model, variables["batch_stats"]
  )
  if use_jit:
    apply_fn, collect_fn = jax.jit(apply_fn), jax.jit(collect_fn)
  stats = collect_fn(variables["params"], images)
  assert set(stats["bn"]) == {"mean", "var"}
  assert stats["bn"]["mean"].shape == (4,)
  assert bool(jnp.all(stats["bn"]["var"] >= 0))
  # Running statistics equal to this batch's give the batch-mode output.
  np.testing.assert_allclose(
    apply_fn(variables["params"], images, stats),
    apply_fn(variables["params"], images, None),
    rtol=1e-4,
    atol=1e-5,
  )
  # The initial running statistics (mean 0, variance 1) give another output.
  assert not np.allclose(
    apply_fn(variables["params"], images, variables["batch_stats"]),
    apply_fn(variables["params"], images, None),
  )


def _captured_axes(monkeypatch):
  figures = []

  def keep_figure(fig, path):
    figures.append(fig)
    return path

  monkeypatch.setattr(plots, "_save", keep_figure)
  return figures


@pytest.mark.parametrize("accuracy", [0.02, 0.5])
def test_accuracy_by_split_shows_chance(monkeypatch, tmp_path, accuracy):
  figures = _captured_axes(monkeypatch)
  records = [
    {"split": split, "ghn": {"top1": accuracy}, "random": {"top1": accuracy}}
    for split in ("test", "wide")
  ]
  chance = 0.1
  plots.plot_accuracy_by_split(records, str(tmp_path / "a.png"), chance=chance)
  bottom, top = figures[0].axes[0].get_ylim()
  assert bottom == 0
  assert top > 100 * chance
  assert top >= 100 * accuracy


def test_include_level_below_range():
  fig, ax = plt.subplots()
  ax.plot([0, 1], [50, 60])
  ax.set_ylim(40, 70)
  plots.include_level(ax, 10.0)
  bottom, top = ax.get_ylim()
  assert bottom < 10.0
  assert top == 70
  plt.close(fig)
