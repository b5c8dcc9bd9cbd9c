"""Meta-training loop of a GHN on DeepNets-1M: `train_and_evaluate`.

Each step draws a meta-batch of training architectures and one image
batch; the GHN predicts all parameters of every network, the networks
classify the images, and the mean cross-entropy is backpropagated into the
GHN (GHN-2 paper, Sec. 3: the loss of Eq. 1 averaged over the meta-batch).
The step runs through `ghn_jax.train.executor`, so no architecture is
compiled as a whole.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from ghn_jax import data
from ghn_jax import ghn as ghn_lib
from ghn_jax.train import (
  arch_stream,
  checkpoint,
  compile_count,
  executor,
  metrics,
  padding,
)

PyTree = Any
GHN_PRESETS = {
  "ghn2": ghn_lib.ghn2_config,
  "ghn2_imagenet": ghn_lib.ghn2_imagenet_config,
  "ghn1": ghn_lib.ghn1_config,
  "mlp_ghn": ghn_lib.mlp_ghn_config,
}
GHN_FILE = "ghn.npz"
EVAL_FILE = "eval_summary.json"
_OUT_OF_MEMORY = "RESOURCE_EXHAUSTED"
# Config fields (and groups of fields) that a resumed run may change: they
# set only the schedule length, logging, checkpointing, where the data is
# read from, the device count and the final evaluation. Changing any other
# field would change the trained GHN or its image or architecture stream.
RESUMABLE_FIELDS = (
  "num_train_steps",
  "num_epochs",
  "log_every_steps",
  "checkpoint_every_steps",
  "max_checkpoints_to_keep",
  "max_nonfinite_steps",
  "num_devices",
  "data_dir",
  "eval",
)
_MISSING = "<missing>"


@flax.struct.dataclass
class TrainState:
  """Everything of a run that changes from step to step on the device.

  Attributes:
    step: meta-training steps done (updates applied or skipped).
    params: the GHN's variables (`{'params': ...}`).
    opt_state: the optimizer state.
    rng: key data of the run's base PRNG key.
    skipped_steps: steps whose update was skipped (non-finite values or
      out of memory).
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  skipped_steps: jax.Array


def make_ghn_config(
  config: ml_collections.ConfigDict, num_classes: int
) -> ghn_lib.GHNConfig:
  """Build the GHN's config from a preset name and field overrides.

  Raises:
    ValueError: for an unknown preset.
  """
  preset = config.ghn.preset
  if preset not in GHN_PRESETS:
    raise ValueError(
      f"Unknown GHN preset {preset!r}: use one of {sorted(GHN_PRESETS)}."
    )
  overrides = dict(config.ghn.overrides)
  overrides.setdefault("num_classes", num_classes)
  return GHN_PRESETS[preset](**overrides)


def total_train_steps(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> int:
  """Return `num_train_steps`, or `num_epochs` epochs of image batches."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with L2 weight decay, step decay and gradient-norm clipping.

  As in the original (PyTorch `Adam(weight_decay=wd)` after
  `clip_grad_norm_`): the gradient is clipped, then `wd * params` is added
  to it, then Adam scales it. The learning rate is multiplied by
  `lr_decay` at each fraction of `total_steps` in `lr_milestones`
  (PyTorch's MultiStepLR at epochs 200 and 250 of 300).

  Returns:
    `(optimizer, schedule)`.
  """
  boundaries = {
    max(1, round(fraction * total_steps)): config.lr_decay
    for fraction in config.lr_milestones
  }
  schedule = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  optimizer = optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    optax.add_decayed_weights(config.weight_decay),
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(schedule),
  )
  return optimizer, schedule


def create_train_state(
  ghn_config: ghn_lib.GHNConfig,
  optimizer: optax.GradientTransformation,
  seed: int,
) -> TrainState:
  """Initialise the GHN and the optimizer."""
  rng = jax.random.PRNGKey(seed)
  init_rng, _ = jax.random.split(rng)
  _, variables = ghn_lib.init_ghn(ghn_config, init_rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables,
    opt_state=optimizer.init(variables),
    rng=rng,
    skipped_steps=jnp.zeros((), jnp.int32),
  )


def make_update_fn(optimizer: optax.GradientTransformation):
  """Return the jitted optimizer update `(state, grads) -> state`."""

  @jax.jit
  def update(state: TrainState, grads: PyTree) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
    )

  return update


@jax.jit
def _global_norm(grads: PyTree) -> jax.Array:
  return optax.tree.norm(grads)


def _architecture_space(
  config: ml_collections.ConfigDict, split: str, num_classes: int
) -> arch_stream.ArchitectureSpace:
  return arch_stream.ArchitectureSpace(
    split=split,
    num_architectures=config.arch.num_architectures,
    seed=config.arch.seed,
    channels=tuple(config.arch.channels),
    fc_dims=tuple(config.arch.fc_dims),
    max_cells=config.arch.max_cells,
    num_classes=num_classes,
    imagenet_input=config.dataset == "imagenet2012",
  )


class _StepResult:
  """Host-side outcome of one step."""

  def __init__(self, loss: float, top1: float, grad_norm: float, ok: bool):
    self.loss, self.top1, self.grad_norm, self.ok = loss, top1, grad_norm, ok


def _mean_across_processes(tree: PyTree) -> PyTree:
  """Average a pytree over the processes of a multi-host run."""
  if jax.process_count() == 1:
    return tree
  # NOTE: runs only with several processes (`jax.distributed`); not
  # exercised by the single-host tests.
  gathered = multihost_utils.process_allgather(tree)
  return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), gathered)


def train_step(
  state: TrainState,
  update_fn,
  ghn_config: ghn_lib.GHNConfig,
  batches: list[executor.MetaBatch],
  images: dict[str, np.ndarray],
  label_smoothing: float,
  devices: list[jax.Device],
) -> tuple[TrainState, _StepResult]:
  """Run one meta-training step; skip the update on non-finite values.

  Args:
    state: the train state.
    update_fn: the jitted optimizer update (`make_update_fn`).
    ghn_config: the GHN's config.
    batches: this process's networks, one meta-batch shard per device.
    images: the image batch ("image", "label").
    label_smoothing: label smoothing of the cross-entropy.
    devices: the local devices the shards run on.

  Returns:
    The new state and the step's loss, accuracy and gradient norm.

  Raises:
    RuntimeError: on out-of-memory, naming the architectures.
  """
  arch_ids = [i for batch in batches for i in batch.arch_ids]
  try:
    loss, logits, grads = executor.sharded_value_and_grad(
      ghn_config,
      state.params,
      batches,
      jnp.asarray(images["image"]),
      jnp.asarray(images["label"]),
      devices,
      label_smoothing,
    )
    grads = _mean_across_processes(grads)
    loss = float(loss)
    grad_norm = float(_global_norm(grads))
  except jax.errors.JaxRuntimeError as error:
    if _OUT_OF_MEMORY not in str(error):
      raise
    raise RuntimeError(
      f"Out of memory at step {int(state.step)} on architectures "
      f"{arch_ids}: lower the meta-batch or image batch size, "
      "or cap the architectures' width (config.arch.channels)."
    ) from error

  top1 = metrics.top1_accuracy(np.asarray(logits), images["label"])
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    logging.warning(
      "Step %d: non-finite loss %s or gradient norm %s on architectures "
      "%s; update skipped.",
      int(state.step),
      loss,
      grad_norm,
      arch_ids,
    )
    state = state.replace(
      step=state.step + 1, skipped_steps=state.skipped_steps + 1
    )
    return state, _StepResult(loss, top1, grad_norm, ok=False)
  return update_fn(state, grads), _StepResult(loss, top1, grad_norm, True)


def _checkpoint_meta(config, ghn_config, image_stream, stream) -> dict:
  return {
    "image_stream": image_stream.get_state(),
    "arch_stream": stream.get_state(),
    "config": config.to_json(),
    "ghn_config": ghn_config.to_json(),
  }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flatten nested dicts into a dict keyed by dotted paths."""
  flat = {}
  for key, value in tree.items():
    path = prefix + key
    if isinstance(value, dict):
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def _is_resumable(field: str) -> bool:
  return any(
    field == name or field.startswith(name + ".") for name in RESUMABLE_FIELDS
  )


def check_resumed_config(
  saved_config_json: str, config: ml_collections.ConfigDict, workdir: str
) -> None:
  """Compare a run's config with the one stored in its checkpoint.

  Fields of `RESUMABLE_FIELDS` may differ, each with a logged warning.

  Args:
    saved_config_json: the config stored in the checkpoint's metadata.
    config: the config of the resuming run.
    workdir: the run directory, named in messages.

  Raises:
    ValueError: if any other field differs, naming the fields.
  """
  saved = _flatten(json.loads(saved_config_json))
  current = _flatten(json.loads(config.to_json()))
  changed = sorted(
    field
    for field in saved.keys() | current.keys()
    if saved.get(field, _MISSING) != current.get(field, _MISSING)
  )
  fixed = [field for field in changed if not _is_resumable(field)]
  if fixed:
    differences = "; ".join(
      f"{field}: {saved.get(field, _MISSING)!r} in the checkpoint, "
      f"{current.get(field, _MISSING)!r} now"
      for field in fixed
    )
    raise ValueError(
      f"Cannot resume the run in {workdir!r} with a different config "
      f"({differences}). These fields change the trained GHN or its data "
      "streams: use a new workdir, or the checkpoint's values."
    )
  for field in changed:
    logging.warning(
      "Resuming %s with config field %s changed from %r to %r.",
      workdir,
      field,
      saved.get(field, _MISSING),
      current.get(field, _MISSING),
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Meta-train a GHN, checkpointing in `workdir`, and evaluate it.

  Resumes from the latest checkpoint in `workdir` if there is one. Writes
  `checkpoints/` (orbax), `ghn.npz` (the final GHN, `ghn.load_ghn`),
  `metrics.csv`, `training_curves.png` and `eval_summary.json`.

  Args:
    config: the run's config (see `ghn_jax/configs/default.py`).
    workdir: the run directory.

  Returns:
    The final train state.

  Raises:
    RuntimeError: after `config.max_nonfinite_steps` consecutive skipped
      updates, or on out-of-memory (naming the architectures).
    ValueError: when resuming with a config that differs in a field outside
      `RESUMABLE_FIELDS`.
  """
  compile_count.install()
  os.makedirs(workdir, exist_ok=True)
  info = data.get_dataset_info(config.dataset)
  ghn_config = make_ghn_config(config, info.num_classes)
  image_stream = data.create_train_stream(
    config.dataset, config.batch_size, config.seed, config.data_dir
  )
  logging.info(
    "Meta-training on dataset %s (%d images, %d batches per epoch).",
    info.name,
    len(image_stream.source),
    image_stream.batches_per_epoch,
  )
  space = _architecture_space(config, config.arch.split, info.num_classes)
  stream = arch_stream.ArchitectureStream(space, config.arch.meta_batch_size)
  total_steps = total_train_steps(config, image_stream.batches_per_epoch)
  optimizer, schedule = make_optimizer(config, total_steps)
  state = create_train_state(ghn_config, optimizer, config.seed)

  manager = checkpoint.create_manager(workdir, config.max_checkpoints_to_keep)
  saved_meta = checkpoint.restore_latest_meta(manager)
  if saved_meta is not None:
    check_resumed_config(saved_meta["config"], config, workdir)
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    _, state, meta = restored
    image_stream.set_state(meta["image_stream"])
    stream.set_state(meta["arch_stream"])
  start_step = int(state.step)
  state = _train(
    config,
    workdir,
    state,
    ghn_config,
    optimizer,
    schedule,
    image_stream,
    stream,
    manager,
    total_steps,
  )

  if start_step < total_steps or manager.latest_step() != total_steps:
    checkpoint.save(
      manager,
      total_steps,
      state,
      _checkpoint_meta(config, ghn_config, image_stream, stream),
    )
  ghn_lib.save_ghn(
    os.path.join(workdir, GHN_FILE), ghn_config, jax.device_get(state.params)
  )
  rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  if rows:
    curves_path = metrics.plot_curves(
      workdir, rows, info.name, info.num_classes
    )
    logging.info("Training curves: %s", curves_path)
  if config.eval.num_architectures > 0:
    summary = evaluate_held_out(config, ghn_config, state.params)
    with open(os.path.join(workdir, EVAL_FILE), "w") as f:
      json.dump(summary, f, indent=2)
  manager.close()
  return state


def _process_devices(config) -> tuple[list[jax.Device], slice]:
  """Local devices to use and this process's slice of each meta-batch.

  All processes draw the same meta-batches; process p takes the p-th of
  `jax.process_count()` equal parts and splits it over its devices.

  Raises:
    ValueError: if the meta-batch does not split evenly over processes.
  """
  devices = jax.local_devices()
  if config.num_devices > 0:
    devices = devices[: config.num_devices]
  meta_batch = config.arch.meta_batch_size
  processes, index = jax.process_count(), jax.process_index()
  if meta_batch % processes:
    raise ValueError(
      f"meta_batch_size={meta_batch} does not split over {processes} "
      "processes: use a multiple of the process count."
    )
  per_process = meta_batch // processes
  devices = devices[: max(1, min(len(devices), per_process))]
  logging.info(
    "Process %d of %d: %d networks per step on devices %s.",
    index,
    processes,
    per_process,
    devices,
  )
  return devices, slice(index * per_process, (index + 1) * per_process)


def _train(
  config,
  workdir,
  state,
  ghn_config,
  optimizer,
  schedule,
  image_stream,
  stream,
  manager,
  total_steps,
) -> TrainState:
  """Run the steps from `state.step` to `total_steps`."""
  update_fn = make_update_fn(optimizer)
  devices, shard = _process_devices(config)
  padder = padding.GrowingPadder()
  start_step = int(state.step)
  writer = metrics.CsvWriter(workdir, start_step)
  loss_mean, top1_mean = metrics.RunningMean(), metrics.RunningMean()
  consecutive_skips = 0
  window_start, window_steps = time.perf_counter(), 0
  progress = tqdm.tqdm(
    total=total_steps, initial=start_step, desc="meta-train", unit="step"
  )
  for step in range(start_step + 1, total_steps + 1):
    ids, net_configs = next(stream)
    images = next(image_stream)
    batches = executor.split_meta_batch(
      ghn_config, net_configs[shard], ids[shard], len(devices), padder
    )
    state, result = train_step(
      state,
      update_fn,
      ghn_config,
      batches,
      images,
      config.label_smoothing,
      devices,
    )
    window_steps += 1
    progress.update(1)
    compile_count.release_programs_near_map_limit()
    if result.ok:
      consecutive_skips = 0
      loss_mean.add(result.loss)
      top1_mean.add(result.top1)
      progress.set_postfix(
        loss=f"{loss_mean.value():.3f}", top1=f"{top1_mean.value():.3f}"
      )
    else:
      consecutive_skips += 1
      if consecutive_skips > config.max_nonfinite_steps:
        progress.close()
        raise RuntimeError(
          f"{consecutive_skips} consecutive steps had a non-finite loss or "
          f"gradient (last at step {step}); stopping. Lower the learning "
          "rate or restart with another seed."
        )

    if step % config.log_every_steps == 0 or step == total_steps:
      elapsed = time.perf_counter() - window_start
      row = {
        "step": step,
        "loss": loss_mean.value(),
        "top1": top1_mean.value(),
        "grad_norm": result.grad_norm,
        "learning_rate": float(schedule(step)),
        "steps_per_sec": window_steps / elapsed,
        "archs_per_sec": window_steps * stream.meta_batch_size / elapsed,
        "compile_count": compile_count.compile_count(),
        "skipped_steps": int(state.skipped_steps),
      }
      writer.write(row)
      logging.info(
        "step %d: loss %.4f top1 %.4f grad_norm %.3f, %.2f archs/s, "
        "%d compilations, %d skipped",
        step,
        row["loss"],
        row["top1"],
        row["grad_norm"],
        row["archs_per_sec"],
        row["compile_count"],
        row["skipped_steps"],
      )
      loss_mean.reset()
      top1_mean.reset()
      window_start, window_steps = time.perf_counter(), 0

    if step % config.checkpoint_every_steps == 0 and step < total_steps:
      checkpoint.save(
        manager,
        step,
        state,
        _checkpoint_meta(config, ghn_config, image_stream, stream),
      )
  progress.close()
  return state


def evaluate_held_out(
  config: ml_collections.ConfigDict,
  ghn_config: ghn_lib.GHNConfig,
  ghn_params: PyTree,
) -> dict[str, Any]:
  """Accuracy of predicted and of randomly initialised held-out networks.

  Uses the first `config.eval.num_architectures` architectures of
  `config.eval.split` and the first `config.eval.num_batches` batches of
  the dataset's evaluation split.

  Returns:
    A summary with the mean and per-network accuracies of both.
  """
  info = data.get_dataset_info(config.dataset)
  space = _architecture_space(config, config.eval.split, info.num_classes)
  net_configs = arch_stream.held_out_architectures(
    space, config.eval.num_architectures, seed=config.seed
  )
  batches = list(
    data.iterate_eval_batches(
      config.dataset,
      config.eval.batch_size,
      config.data_dir,
      max_examples=config.eval.batch_size * config.eval.num_batches,
    )
  )
  forward_fn, _ = executor.ghn_functions(ghn_config)
  padder = padding.GrowingPadder()
  predicted, random_init = [], []
  for index, net_config in enumerate(net_configs):
    batch = executor.prepare_meta_batch(
      ghn_config, [net_config], [index], padder
    )
    outputs = forward_fn(ghn_params, batch.inputs)
    params = executor.assemble_network_params(outputs, batch.plans[0])
    network = batch.networks[0]
    init_params = network.init(
      jax.random.PRNGKey(index), jnp.asarray(batches[0]["image"][:1])
    )["params"]
    predicted.append(_accuracy(network, params, batches))
    random_init.append(_accuracy(network, init_params, batches))
  summary = {
    "split": config.eval.split,
    "num_architectures": len(net_configs),
    "num_images": int(sum(len(b["label"]) for b in batches)),
    "predicted_top1_mean": float(np.mean(predicted)),
    "random_init_top1_mean": float(np.mean(random_init)),
    "predicted_top1": predicted,
    "random_init_top1": random_init,
  }
  logging.info(
    "Held-out %s architectures: top-1 %.4f with predicted parameters, "
    "%.4f with random initialisation.",
    config.eval.split,
    summary["predicted_top1_mean"],
    summary["random_init_top1_mean"],
  )
  return summary


def _accuracy(network, params: PyTree, batches) -> float:
  correct = total = 0
  for batch in batches:
    logits = network.apply({"params": params}, jnp.asarray(batch["image"]))
    correct += int(np.sum(np.argmax(logits, -1) == batch["label"]))
    total += len(batch["label"])
  return correct / total
