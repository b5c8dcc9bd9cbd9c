"""Tests of the meta-training loop: end to end, resume, NaN handling."""

import importlib
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from ghn_jax import ghn as ghn_lib
from ghn_jax.configs import cpu_default
from ghn_jax.train import arch_stream, checkpoint, executor, loop, metrics

NUM_STEPS = 4
CONFIG_NAMES = (
  "cpu_default",
  "ghn2_cifar10",
  "ghn2_imagenet",
  "ghn1_cifar10",
  "mlp_ghn_cifar10",
  "no_virtual_edges",
  "no_layernorm",
  "no_weight_norm",
  "meta_batch1",
)


def _tiny_config() -> ml_collections.ConfigDict:
  config = cpu_default.get_config()
  config.dataset = "cifar10"
  config.batch_size = 4
  config.ghn.overrides.hid = 8
  config.ghn.overrides.max_shape = (8, 8, 3, 3)
  config.arch.num_architectures = 2
  config.arch.meta_batch_size = 1
  config.arch.channels = (8,)
  config.arch.fc_dims = (8,)
  config.num_train_steps = NUM_STEPS
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval.num_architectures = 0
  return config


def _train(config, workdir):
  with tfds.testing.mock_data(num_examples=16):
    return loop.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  state = _train(_tiny_config(), workdir)
  return workdir, state


def test_train_end_to_end_outputs(finished_run):
  workdir, state = finished_run
  assert int(state.step) == NUM_STEPS
  assert int(state.skipped_steps) == 0
  rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["compile_count"] > 0
  assert os.path.isfile(os.path.join(workdir, metrics.CURVES_FILE))
  manager = checkpoint.create_manager(str(workdir), 2)
  assert manager.latest_step() == NUM_STEPS


def test_train_saves_loadable_ghn(finished_run):
  workdir, state = finished_run
  ghn, variables = ghn_lib.load_ghn(os.path.join(workdir, loop.GHN_FILE))
  assert ghn.config.hid == 8
  for got, want in zip(
    jax.tree_util.tree_leaves(variables),
    jax.tree_util.tree_leaves(state.params),
    strict=True,
  ):
    np.testing.assert_array_equal(got, want)


def test_train_changes_params(finished_run):
  _, state = finished_run
  config = _tiny_config()
  ghn_config = loop.make_ghn_config(config, 10)
  optimizer, _ = loop.make_optimizer(config, NUM_STEPS)
  initial = loop.create_train_state(ghn_config, optimizer, config.seed)
  diffs = [
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree_util.tree_leaves(state.params),
      jax.tree_util.tree_leaves(initial.params),
      strict=True,
    )
  ]
  assert max(diffs) > 0


def test_resume_matches_uninterrupted(finished_run, tmp_path, monkeypatch):
  _, expected = finished_run
  config = _tiny_config()
  original_step = loop.train_step
  calls = []

  def interrupted_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("simulated kill")
    return original_step(*args, **kwargs)

  monkeypatch.setattr(loop, "train_step", interrupted_step)
  with pytest.raises(KeyboardInterrupt):
    _train(config, tmp_path)
  monkeypatch.setattr(loop, "train_step", original_step)
  manager = checkpoint.create_manager(str(tmp_path), 2)
  assert manager.latest_step() == 2

  resumed = _train(config, tmp_path)
  assert int(resumed.step) == NUM_STEPS
  for got, want in zip(
    jax.tree_util.tree_leaves(resumed.params),
    jax.tree_util.tree_leaves(expected.params),
    strict=True,
  ):
    np.testing.assert_array_equal(got, want)
  rows = metrics.read_metrics(os.path.join(tmp_path, metrics.METRICS_FILE))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]


def _nan_on_calls(monkeypatch, bad_calls):
  original = executor.meta_value_and_grad
  calls = []

  def value_and_grad(*args, **kwargs):
    calls.append(1)
    loss, logits, grads = original(*args, **kwargs)
    if len(calls) in bad_calls:
      grads = jax.tree_util.tree_map(lambda g: g * jnp.nan, grads)
    return loss, logits, grads

  monkeypatch.setattr(executor, "meta_value_and_grad", value_and_grad)


def test_nan_gradient_skips_update(tmp_path, monkeypatch):
  _nan_on_calls(monkeypatch, bad_calls={2})
  state = _train(_tiny_config(), tmp_path)
  assert int(state.step) == NUM_STEPS
  assert int(state.skipped_steps) == 1
  assert checkpoint.all_finite(state.params)
  manager = checkpoint.create_manager(str(tmp_path), 2)
  restored = checkpoint.restore_latest(manager, state)
  assert checkpoint.all_finite(restored[1])


def test_nan_patience_stops_training(tmp_path, monkeypatch):
  _nan_on_calls(monkeypatch, bad_calls=set(range(1, NUM_STEPS + 1)))
  config = _tiny_config()
  config.max_nonfinite_steps = 1
  with pytest.raises(RuntimeError, match="consecutive steps"):
    _train(config, tmp_path)


def test_checkpoint_rejects_nan_state(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), 2)
  state = {"w": np.array([1.0, np.nan], np.float32)}
  with pytest.raises(ValueError, match="NaN"):
    checkpoint.save(manager, 1, state, {})
  assert manager.latest_step() is None


def test_optimizer_is_adam_with_l2_after_clipping():
  config = cpu_default.get_config()
  config.grad_clip = 1.0
  config.weight_decay = 0.5
  optimizer, _ = loop.make_optimizer(config, total_steps=10)
  params = {"w": jnp.array([2.0, -1.0])}
  grads = {"w": jnp.array([3.0, 4.0])}  # norm 5, clipped to 1
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  clipped = np.array([0.6, 0.8])
  with_l2 = clipped + 0.5 * np.array([2.0, -1.0])
  # First Adam step: update = -lr * g / (|g| + eps).
  expected = -config.learning_rate * with_l2 / (np.abs(with_l2) + 1e-8)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_schedule_decays_at_two_thirds_and_five_sixths():
  config = cpu_default.get_config()
  _, schedule = loop.make_optimizer(config, total_steps=300)
  lr = config.learning_rate
  np.testing.assert_allclose(schedule(199), lr)
  np.testing.assert_allclose(schedule(200), lr * 0.1)
  np.testing.assert_allclose(schedule(249), lr * 0.1)
  np.testing.assert_allclose(schedule(250), lr * 0.01, rtol=1e-6)


def test_total_train_steps_from_epochs():
  config = cpu_default.get_config()
  config.num_train_steps = -1
  config.num_epochs = 3
  assert loop.total_train_steps(config, steps_per_epoch=781) == 2343


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_files_build_ghn_config(name):
  module = importlib.import_module(f"ghn_jax.configs.{name}")
  config = module.get_config()
  ghn_config = loop.make_ghn_config(config, num_classes=10)
  assert isinstance(ghn_config, ghn_lib.GHNConfig)
  assert config.grad_clip == 5.0
  if name == "no_virtual_edges":
    assert not ghn_config.virtual_edges
  if name == "no_layernorm":
    assert not ghn_config.layernorm
  if name == "no_weight_norm":
    assert not ghn_config.weight_norm
  if name == "mlp_ghn_cifar10":
    assert ghn_config.gnn == "mlp"
  if name == "meta_batch1":
    assert config.arch.meta_batch_size == 1
  if name == "ghn2_cifar10":
    assert config.arch.meta_batch_size == 8
    assert config.batch_size == 64
    assert config.num_epochs == 300


def test_unknown_ghn_preset():
  config = cpu_default.get_config()
  config.ghn.preset = "ghn9"
  with pytest.raises(ValueError, match="ghn9"):
    loop.make_ghn_config(config, 10)


def test_arch_stream_resume_and_widths():
  space = arch_stream.ArchitectureSpace(
    num_architectures=5, channels=(8, 16), fc_dims=(32,), max_cells=4
  )
  stream = arch_stream.ArchitectureStream(space, meta_batch_size=2)
  first_epoch = [next(stream) for _ in range(2)]
  ids = [i for batch_ids, _ in first_epoch for i in batch_ids]
  assert len(set(ids)) == 4
  for _, configs in first_epoch:
    for net in configs:
      assert net.channels in (8, 16)
      assert net.fc_dim == 32
      assert net.num_cells <= 4
  state = stream.get_state()
  expected = next(stream)
  resumed = arch_stream.ArchitectureStream(space, meta_batch_size=2)
  resumed.set_state(state)
  assert next(resumed) == expected


def test_arch_id_out_of_range():
  space = arch_stream.ArchitectureSpace(num_architectures=3)
  with pytest.raises(ValueError, match="out of range"):
    arch_stream.architecture(space, 3)


def test_top1_accuracy_of_stacked_logits():
  logits = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
  assert metrics.top1_accuracy(logits, np.array([0, 1])) == 0.75


def test_global_norm_matches_optax():
  grads = {"a": jnp.ones(3), "b": {"c": jnp.full((2,), 2.0)}}
  np.testing.assert_allclose(loop._global_norm(grads), optax.tree.norm(grads))


def _metrics_row(step: int) -> dict:
  return {
    "step": step,
    "loss": 2.5 / step,
    "top1": 0.125 * step,
    "grad_norm": 1.0,
    "learning_rate": 0.001,
    "steps_per_sec": 3.0,
    "archs_per_sec": 12.0,
    "compile_count": 640 + step,
    "skipped_steps": 0,
  }


def test_csv_writer_resume_keeps_row_text(tmp_path):
  writer = metrics.CsvWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(_metrics_row(step))
  path = os.path.join(tmp_path, metrics.METRICS_FILE)
  with open(path) as f:
    original = f.read().splitlines()

  resumed = metrics.CsvWriter(str(tmp_path), start_step=2)
  with open(path) as f:
    kept = f.read().splitlines()
  assert kept == original[:3]
  assert kept[1].startswith("1,")
  assert kept[1].endswith(",641,0")
  assert os.listdir(tmp_path) == [metrics.METRICS_FILE]

  resumed.write(_metrics_row(3))
  with open(path) as f:
    assert f.read().splitlines() == original


def test_csv_writer_resume_at_zero(tmp_path):
  writer = metrics.CsvWriter(str(tmp_path))
  writer.write(_metrics_row(1))
  metrics.CsvWriter(str(tmp_path), start_step=0)
  with open(os.path.join(tmp_path, metrics.METRICS_FILE)) as f:
    lines = f.read().splitlines()
  assert lines == [",".join(metrics.FIELDS)]


def test_resumed_config_rejects_model_fields():
  saved = _tiny_config().to_json()
  config = _tiny_config()
  config.arch.meta_batch_size = 2
  config.ghn.overrides.hid = 16
  with pytest.raises(ValueError) as info:
    loop.check_resumed_config(saved, config, "run_dir")
  message = str(info.value)
  assert "arch.meta_batch_size: 1 in the checkpoint, 2 now" in message
  assert "ghn.overrides.hid: 8 in the checkpoint, 16 now" in message
  assert "new workdir" in message


def test_resumed_config_warns_on_schedule_fields(caplog):
  saved = _tiny_config().to_json()
  config = _tiny_config()
  config.num_train_steps = 2 * NUM_STEPS
  config.eval.num_architectures = 3
  loop.check_resumed_config(saved, config, "run_dir")
  warnings = [r.getMessage() for r in caplog.records]
  assert any("num_train_steps" in m for m in warnings)
  assert any("eval.num_architectures" in m for m in warnings)


def test_resumed_config_same_is_silent(caplog):
  config = _tiny_config()
  loop.check_resumed_config(config.to_json(), config, "run_dir")
  assert caplog.records == []


def test_resume_with_changed_ghn_raises(finished_run):
  workdir, _ = finished_run
  config = _tiny_config()
  config.ghn.overrides.hid = 16
  before = os.path.getmtime(os.path.join(workdir, metrics.METRICS_FILE))
  with pytest.raises(ValueError, match="ghn.overrides.hid"):
    _train(config, workdir)
  after = os.path.getmtime(os.path.join(workdir, metrics.METRICS_FILE))
  assert after == before


def test_training_curves_title_and_chance(tmp_path):
  rows = [_metrics_row(step) for step in (1, 2, 3)]
  for row in rows:
    row["top1"] = 0.01
  figure = metrics.make_curves_figure(rows, "Meta-training on cifar10: run", 10)
  top1_axis = figure.axes[1]
  assert figure._suptitle.get_text() == "Meta-training on cifar10: run"
  assert "training batches" in top1_axis.get_ylabel()
  chance_lines = [
    line for line in top1_axis.get_lines() if line.get_label() == "chance"
  ]
  assert len(chance_lines) == 1
  assert list(chance_lines[0].get_ydata()) == [10.0, 10.0]
  assert top1_axis.get_ylim()[1] > 10.0
  plt.close(figure)

  run_dir = tmp_path / "my_run"
  run_dir.mkdir()
  path = metrics.plot_curves(str(run_dir), rows, "cifar10", 10)
  assert path == os.path.join(run_dir, metrics.CURVES_FILE)
  assert os.path.getsize(path) > 0
