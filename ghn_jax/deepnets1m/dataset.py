"""DeepNets-1M on disk: generation in shards, reading, meta-batch loading.

A split directory contains `meta.json` (split, seed, counts, shard size) and
`shard_00000.npz`, ... Each shard stores `shard_size` architectures as
integer arrays (no pickles): one row per network with its scalar settings,
its genotype as operation and input-state indices, its concatenation as a
0/1 mask, and the parameter counts at generator width. Shard `k` is sampled
from its own random stream (seed, split, k), so shards can be generated in
any order and in parallel. Each shard is written to a temporary file, then
renamed, so an interrupted run resumes by skipping the shards on disk.

An optional `graph_fn(config) -> ghn_jax.graph.Graph` stores each network's
GHN graph in `graphs_00000.npz` next to its shard (nodes and edges of all
networks concatenated, with offsets); graphs are kept in the node order the
builder returns, with edges indexing that same order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import queue
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from ghn_jax.deepnets1m import genotypes as genotypes_lib
from ghn_jax.deepnets1m import sampler as sampler_lib
from ghn_jax.deepnets1m.config import NetConfig

FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_SIZE = 250
# Columns of the `settings` array of a shard, in order.
SETTINGS_COLUMNS = (
  "channels",
  "num_classes",
  "num_cells",
  "stem_kernel_size",
  "imagenet_input",
  "stem_pool",
  "stem_type",
  "vit",
  "batch_norm",
  "preprocess",
  "channel_multiplier",
  "num_fc_layers",
  "fc_dim",
  "global_pooling",
  "steps",
)
_COLUMN = {name: i for i, name in enumerate(SETTINGS_COLUMNS)}
# Padding of unused genotype edges.
_NO_EDGE = -1

GraphFn = Callable[[NetConfig], Any]


def build_network_graph(config: NetConfig):
  """Build the GHN graph of a network (`graph_fn` for stored graphs).

  Uses the direct builder of `ghn_jax.graph_deepnets`, which gives the same
  graph as tracing the Flax network, in a few milliseconds.
  """
  from ghn_jax import graph_deepnets

  return graph_deepnets.build_deepnets_graph(config)


def _shard_name(shard: int) -> str:
  return f"shard_{shard:05d}.npz"


def _graph_name(shard: int) -> str:
  return f"graphs_{shard:05d}.npz"


def encode_configs(configs: Sequence[NetConfig]) -> dict[str, np.ndarray]:
  """Encode networks as integer arrays (see the module docstring)."""
  num = len(configs)
  max_steps = max(c.steps for c in configs)
  settings = np.zeros((num, len(SETTINGS_COLUMNS)), np.int32)
  ops = np.full((num, 2, 2 * max_steps), _NO_EDGE, np.int8)
  inputs = np.full((num, 2, 2 * max_steps), _NO_EDGE, np.int8)
  concat = np.zeros((num, 2, max_steps), np.uint8)
  for row, config in enumerate(configs):
    values = {
      "channels": config.channels,
      "num_classes": config.num_classes,
      "num_cells": config.num_cells,
      "stem_kernel_size": config.stem_kernel_size,
      "imagenet_input": config.imagenet_input,
      "stem_pool": config.stem_pool,
      "stem_type": config.stem_type,
      "vit": config.vit,
      "batch_norm": config.norm is not None,
      "preprocess": config.preprocess,
      "channel_multiplier": config.channel_multiplier,
      "num_fc_layers": config.num_fc_layers,
      "fc_dim": config.fc_dim,
      "global_pooling": config.global_pooling,
      "steps": config.steps,
    }
    settings[row] = [int(values[name]) for name in SETTINGS_COLUMNS]
    for cell in range(2):
      edges, cell_concat = config.genotype.cell(reduction=bool(cell))
      for edge, (op, state) in enumerate(edges):
        ops[row, cell, edge] = genotypes_lib.OPERATION_INDEX[op]
        inputs[row, cell, edge] = state
      for state in cell_concat:
        concat[row, cell, state - genotypes_lib.NUM_CELL_INPUTS] = 1
  return {"settings": settings, "ops": ops, "inputs": inputs, "concat": concat}


def decode_config(arrays: dict[str, np.ndarray], row: int) -> NetConfig:
  """Decode network `row` of arrays made by `encode_configs`."""
  settings = arrays["settings"][row]
  value = {name: int(settings[i]) for name, i in _COLUMN.items()}
  cells = []
  for cell in range(2):
    ops = arrays["ops"][row, cell]
    inputs = arrays["inputs"][row, cell]
    edges = tuple(
      (genotypes_lib.OPERATIONS[op], int(state))
      for op, state in zip(ops, inputs, strict=True)
      if op != _NO_EDGE
    )
    mask = arrays["concat"][row, cell]
    concat = tuple(
      int(i) + genotypes_lib.NUM_CELL_INPUTS for i in np.flatnonzero(mask)
    )
    cells.append((edges, concat))
  genotype = genotypes_lib.Genotype(
    cells[0][0], cells[0][1], cells[1][0], cells[1][1]
  )
  return NetConfig(
    genotype=genotype,
    channels=value["channels"],
    num_classes=value["num_classes"],
    num_cells=value["num_cells"],
    stem_kernel_size=value["stem_kernel_size"],
    imagenet_input=bool(value["imagenet_input"]),
    stem_pool=bool(value["stem_pool"]),
    stem_type=value["stem_type"],
    vit=bool(value["vit"]),
    norm="bn" if value["batch_norm"] else None,
    preprocess=bool(value["preprocess"]),
    channel_multiplier=value["channel_multiplier"],
    num_fc_layers=value["num_fc_layers"],
    fc_dim=value["fc_dim"],
    global_pooling=bool(value["global_pooling"]),
  )


def _temporary_path(path: str) -> str:
  """Return a unique name next to `path` for a file to rename into place.

  Unlike `tempfile.mkstemp`, which creates files with mode 0o600, a file
  opened under this name with mode "x" gets the usual 0o666 minus the umask.
  """
  return f"{path}.{uuid.uuid4().hex}.tmp"


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Write an npz file under a temporary name, then rename it into place."""
  tmp = _temporary_path(path)
  try:
    with open(tmp, "xb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _encode_graphs(graphs: Sequence[Any]) -> dict[str, np.ndarray]:
  """Concatenate the graphs' node and edge arrays, with per-graph counts."""

  def cat(name, dtype):
    return np.concatenate(
      [np.asarray(getattr(g, name)) for g in graphs]
    ).astype(dtype)

  return {
    "num_nodes": np.array([g.num_nodes for g in graphs], np.int64),
    "num_edges": np.array([g.num_edges for g in graphs], np.int64),
    "node_ops": cat("node_ops", np.int8),
    "node_shapes": cat("node_shapes", np.int32),
    "node_param_perm": cat("node_param_perm", np.int8),
    "node_params": cat("node_params", np.str_),
    "node_extra_params": cat("node_extra_params", np.str_),
    "senders": cat("senders", np.int32),
    "receivers": cat("receivers", np.int32),
  }


def generate_shard(
  directory: str,
  split: str,
  seed: int,
  shard: int,
  shard_size: int,
  graph_fn: GraphFn | None = None,
) -> dict[str, int]:
  """Sample and write one shard (skipped if it exists); return rejections.

  Args:
    directory: the split directory.
    split: one of `sampler.SPLITS`.
    seed: seed of the split.
    shard: shard index, which selects the random stream.
    shard_size: architectures in the shard.
    graph_fn: optional builder of each network's graph.

  Returns:
    Rejected candidates by reason (empty if the shard already existed).
  """
  path = os.path.join(directory, _shard_name(shard))
  graph_path = os.path.join(directory, _graph_name(shard))
  if os.path.exists(path) and (graph_fn is None or os.path.exists(graph_path)):
    return {}
  rejections = collections.Counter()
  rng = sampler_lib.split_rng(split, seed, shard)
  archs = list(
    sampler_lib.sample_architectures(split, shard_size, rng, rejections)
  )
  arrays = encode_configs([a.config for a in archs])
  arrays["num_params_cifar"] = np.array(
    [a.num_params_cifar for a in archs], np.int64
  )
  arrays["num_params_imagenet"] = np.array(
    [a.num_params_imagenet for a in archs], np.int64
  )
  if graph_fn is not None:
    graphs = [graph_fn(a.config) for a in archs]
    _atomic_savez(graph_path, _encode_graphs(graphs))
  _atomic_savez(path, arrays)
  return dict(rejections)


def _write_meta(directory: str, meta: dict[str, Any]) -> None:
  path = os.path.join(directory, META_FILE)
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
    keys = ("split", "seed", "num", "shard_size", "format_version")
    if any(existing.get(k) != meta[k] for k in keys):
      raise ValueError(
        f"{directory} contains a dataset with other settings "
        f"({ {k: existing.get(k) for k in keys} }); use another directory "
        f"or the same settings ({ {k: meta[k] for k in keys} }) to resume."
      )
    return
  tmp = _temporary_path(path)
  with open(tmp, "x") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, path)


def generate_split(
  directory: str,
  split: str,
  num: int,
  seed: int = 0,
  *,
  shard_size: int = DEFAULT_SHARD_SIZE,
  num_workers: int = 1,
  graph_fn: GraphFn | None = None,
  progress: bool = True,
) -> dict[str, int]:
  """Generate `num` architectures of a split into `directory` (resumable).

  Args:
    directory: output directory (created if missing).
    split: one of `sampler.SPLITS`.
    num: number of architectures.
    seed: seed of the split.
    shard_size: architectures per shard; part of the dataset's identity
      (a different shard size gives different architectures).
    num_workers: processes that generate shards in parallel.
    graph_fn: optional graph builder (a picklable module-level function
      when `num_workers` > 1).
    progress: show a tqdm progress bar.

  Returns:
    Rejected candidates by reason, over the shards generated by this call.

  Raises:
    ValueError: on an unknown split, a `num`, `shard_size` or `num_workers`
      below 1, or a directory that contains a dataset with other settings.
  """
  sampler_lib.split_settings(split)
  for name, value in (
    ("num", num),
    ("shard_size", shard_size),
    ("num_workers", num_workers),
  ):
    if value < 1:
      raise ValueError(f"{name}={value!r} is invalid: pass an integer >= 1.")
  os.makedirs(directory, exist_ok=True)
  num_shards = -(-num // shard_size)
  sizes = [min(shard_size, num - k * shard_size) for k in range(num_shards)]
  _write_meta(
    directory,
    {
      "format_version": FORMAT_VERSION,
      "split": split,
      "seed": seed,
      "num": num,
      "shard_size": shard_size,
      "num_shards": num_shards,
      "with_graphs": graph_fn is not None,
      "settings_columns": list(SETTINGS_COLUMNS),
      "operations": list(genotypes_lib.OPERATIONS),
    },
  )
  args = [
    (directory, split, seed, k, sizes[k], graph_fn) for k in range(num_shards)
  ]
  rejections = collections.Counter()
  bar = _progress_bar(num, split, progress)
  if num_workers <= 1:
    for k, arg in enumerate(args):
      rejections.update(generate_shard(*arg))
      bar.update(sizes[k])
  else:
    # Forking is fastest, but unsafe once JAX (multithreaded) is loaded;
    # spawned workers import only NumPy and the sampler.
    method = "spawn" if "jax" in sys.modules else "fork"
    context = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(
      min(num_workers, num_shards), mp_context=context
    ) as pool:
      futures = {
        pool.submit(generate_shard, *arg): k for k, arg in enumerate(args)
      }
      for future in concurrent.futures.as_completed(futures):
        rejections.update(future.result())
        bar.update(sizes[futures[future]])
  bar.close()
  logging.info(
    "Generated %d %s architectures in %s; rejected candidates: %s",
    num,
    split,
    directory,
    dict(rejections),
  )
  return dict(rejections)


def _progress_bar(total: int, split: str, enabled: bool):
  import tqdm

  return tqdm.tqdm(
    total=total, desc=f"{split} architectures", unit="net", disable=not enabled
  )


class ArchitectureDataset:
  """A generated split, read fully into memory.

  Item `i` is the `NetConfig` of network `i` at its evaluation width (the
  generator width, or 4x/2x the channels for the wide split).
  """

  def __init__(self, directory: str):
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
      raise ValueError(
        f"{directory} has no {META_FILE}; generate the split first with "
        "experiments/generate_nets.py."
      )
    with open(path) as f:
      self.meta = json.load(f)
    self.directory = directory
    self.split = self.meta["split"]
    parts = []
    graph_parts = []
    for shard in range(self.meta["num_shards"]):
      shard_path = os.path.join(directory, _shard_name(shard))
      if not os.path.exists(shard_path):
        raise ValueError(
          f"{shard_path} is missing; rerun the generation command with the "
          "same arguments to finish it."
        )
      with np.load(shard_path) as data:
        parts.append({k: data[k] for k in data.files})
      graph_path = os.path.join(directory, _graph_name(shard))
      if os.path.exists(graph_path):
        with np.load(graph_path) as data:
          graph_parts.append({k: data[k] for k in data.files})
    self.arrays = _concat_shards(parts)
    self._node_offsets = self._edge_offsets = None
    self.graph_arrays = (
      _concat_graphs(graph_parts) if len(graph_parts) == len(parts) else None
    )

  def __len__(self) -> int:
    return int(self.arrays["settings"].shape[0])

  def config(self, index: int) -> NetConfig:
    """Return network `index` at generator width."""
    if not -len(self) <= index < len(self):
      raise IndexError(
        f"Network index {index} is out of range for {len(self)} networks."
      )
    return decode_config(self.arrays, index % len(self))

  def __getitem__(self, index: int) -> NetConfig:
    return sampler_lib.eval_width(self.split, self.config(index))

  def num_params(self, index: int, imagenet: bool = False) -> int:
    """Parameter count of network `index` at generator width (all modules)."""
    key = "num_params_imagenet" if imagenet else "num_params_cifar"
    return int(self.arrays[key][index])

  @property
  def num_nodes(self) -> np.ndarray | None:
    """Graph nodes of each network, if graphs were stored."""
    if self.graph_arrays is None:
      return None
    return self.graph_arrays["num_nodes"]

  def graph(self, index: int):
    """Return the stored `ghn_jax.graph.Graph` of network `index`.

    Raises:
      ValueError: if the split was generated without graphs.
    """
    from ghn_jax import graph as graph_lib

    if self.graph_arrays is None:
      raise ValueError(
        f"{self.directory} has no stored graphs; generate it with --graphs."
      )
    arrays = self.graph_arrays
    if self._node_offsets is None:
      self._node_offsets = np.concatenate([[0], np.cumsum(arrays["num_nodes"])])
      self._edge_offsets = np.concatenate([[0], np.cumsum(arrays["num_edges"])])
    nodes = slice(*self._node_offsets[index : index + 2])
    edges = slice(*self._edge_offsets[index : index + 2])
    return graph_lib.Graph(
      node_ops=arrays["node_ops"][nodes].astype(np.int32),
      node_shapes=arrays["node_shapes"][nodes].astype(np.int64),
      node_params=tuple(str(p) for p in arrays["node_params"][nodes]),
      node_extra_params=tuple(
        str(p) for p in arrays["node_extra_params"][nodes]
      ),
      node_param_perm=arrays["node_param_perm"][nodes].astype(np.int32),
      senders=arrays["senders"][edges].astype(np.int32),
      receivers=arrays["receivers"][edges].astype(np.int32),
    )


def _concat_shards(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  max_edges = max(p["ops"].shape[-1] for p in parts)
  max_steps = max(p["concat"].shape[-1] for p in parts)
  arrays = collections.defaultdict(list)
  for part in parts:
    for key, value in part.items():
      if key in ("ops", "inputs"):
        pad = max_edges - value.shape[-1]
        value = np.pad(value, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
      elif key == "concat":
        pad = max_steps - value.shape[-1]
        value = np.pad(value, ((0, 0), (0, 0), (0, pad)))
      arrays[key].append(value)
  return {k: np.concatenate(v) for k, v in arrays.items()}


def _concat_graphs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def meta_batches(
  dataset: ArchitectureDataset,
  batch_size: int,
  rng: np.random.Generator,
  *,
  train: bool = True,
  max_nodes: int | None = None,
  imagenet: bool = False,
) -> Iterator[list[tuple[int, NetConfig]]]:
  """Yield meta-batches of (index, config) forever (train) or once (eval).

  Training draws networks in a new random order each epoch and re-draws
  each network's channels and fc_dim at every use
  (`sampler.sample_training_width`); a batch whose networks have more than
  `max_nodes` graph nodes in total is dropped (needs stored graphs), as
  the original does to bound memory. Evaluation walks the split in order
  at its evaluation width.

  Args:
    dataset: the split.
    batch_size: networks per meta-batch.
    rng: the random generator of order and widths.
    train: training (infinite, shuffled, re-drawn widths) or evaluation.
    max_nodes: optional cap on a batch's total graph nodes.
    imagenet: networks take ImageNet inputs (counts and widths change).

  Raises:
    ValueError: if `batch_size` < 1, or `max_nodes` is given for a split
      without stored graphs or is below the smallest possible batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be positive.")
  nodes = dataset.num_nodes
  if max_nodes is not None and nodes is None:
    raise ValueError(
      "max_nodes needs stored graphs; generate the split with graphs or "
      "pass max_nodes=None."
    )
  if max_nodes is not None and train:
    smallest = np.sort(nodes)[: min(batch_size, len(nodes))].sum()
    if smallest > max_nodes:
      raise ValueError(
        f"max_nodes={max_nodes} is below the {smallest} nodes of the "
        f"smallest batch of {batch_size} networks; raise max_nodes or "
        "lower batch_size."
      )
  if not train:
    for start in range(0, len(dataset), batch_size):
      stop = min(start + batch_size, len(dataset))
      yield [(i, _with_input(dataset[i], imagenet)) for i in range(start, stop)]
    return
  while True:
    order = rng.permutation(len(dataset))
    for start in range(0, len(order), batch_size):
      indices = order[start : start + batch_size]
      if max_nodes is not None and nodes[indices].sum() > max_nodes:
        continue
      batch = []
      for i in indices:
        config = _with_input(dataset.config(int(i)), imagenet)
        channels, fc_dim = sampler_lib.sample_training_width(
          config, dataset.num_params(int(i), imagenet), rng
        )
        batch.append((int(i), config.replace(channels=channels, fc_dim=fc_dim)))
      yield batch


def _with_input(config: NetConfig, imagenet: bool) -> NetConfig:
  if config.imagenet_input == imagenet:
    return config
  return config.replace(imagenet_input=imagenet)


class BackgroundLoader:
  """Run an iterator (and an optional map) in a background thread.

  Keeps up to `buffer_size` items ready so the consumer (the training step)
  does not wait on sampling or graph building. Errors of the producer are
  raised in the consumer.
  """

  _DONE = object()

  def __init__(
    self,
    iterator: Iterator[Any],
    map_fn: Callable[[Any], Any] | None = None,
    buffer_size: int = 4,
  ):
    if buffer_size < 1:
      raise ValueError(f"buffer_size={buffer_size!r} must be positive.")
    self._queue: queue.Queue = queue.Queue(buffer_size)
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._produce, args=(iterator, map_fn), daemon=True
    )
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, iterator, map_fn) -> None:
    try:
      for item in iterator:
        if map_fn is not None:
          item = map_fn(item)
        if not self._put(item):
          return
    except BaseException as error:  # Re-raised in the consumer.
      self._put(error)
      return
    self._put(self._DONE)

  def __iter__(self) -> BackgroundLoader:
    return self

  def __next__(self) -> Any:
    item = self._queue.get()
    if item is self._DONE:
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    """Stop the producer thread."""
    self._stop.set()
    self._thread.join(timeout=1.0)

  def __enter__(self) -> BackgroundLoader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
