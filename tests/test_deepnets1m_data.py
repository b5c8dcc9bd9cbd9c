"""Tests of the DeepNets-1M sampler, on-disk dataset and loaders."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ghn_jax.deepnets1m import dataset as dataset_lib
from ghn_jax.deepnets1m import genotypes as genotypes_lib
from ghn_jax.deepnets1m import plan as plan_lib
from ghn_jax.deepnets1m import sampler as sampler_lib


def _configs(split, num, seed, shard=0):
  rng = sampler_lib.split_rng(split, seed, shard)
  return [a.config for a in sampler_lib.sample_architectures(split, num, rng)]


# Sampler


def test_sampler_is_reproducible_from_seed():
  assert _configs("train", 20, seed=7) == _configs("train", 20, seed=7)
  assert _configs("train", 20, seed=7) != _configs("train", 20, seed=8)
  assert _configs("train", 20, 7, shard=0) != _configs("train", 20, 7, shard=1)


def test_wide_split_holds_test_architectures():
  test = _configs("test", 10, seed=1)
  wide = _configs("wide", 10, seed=1)
  assert wide == test
  assert _configs("val", 10, seed=1) != test
  widened = sampler_lib.eval_width("wide", wide[0])
  assert widened.channels == sampler_lib.WIDE_FACTOR_CIFAR * test[0].channels
  imagenet = wide[0].replace(imagenet_input=True)
  assert sampler_lib.eval_width("wide", imagenet).channels == (
    sampler_lib.WIDE_FACTOR_IMAGENET * imagenet.channels
  )
  assert sampler_lib.eval_width("test", test[0]) == test[0]


def test_unknown_split_raises():
  with pytest.raises(ValueError, match="'huge'"):
    sampler_lib.split_settings("huge")
  with pytest.raises(ValueError, match="'huge'"):
    next(sampler_lib.sample_architectures("huge", 1, np.random.default_rng()))


def test_sample_genotype_pool_only_reduction_without_none():
  rng = np.random.default_rng(0)
  for _ in range(50):
    genotype = sampler_lib.sample_genotype(
      rng, steps=3, only_pool=True, allow_none=False, drop_concat=True
    )
    reduce_ops = {op for op, _ in genotype.reduce}
    assert reduce_ops <= {"max_pool_3x3", "avg_pool_3x3", "skip_connect"}
    assert "none" not in genotype.all_ops()
    assert "msa" not in genotype.all_ops()
    # The last sum node always joins the concatenation.
    assert genotype.normal_concat[-1] == 4
    assert genotype.normal_concat == genotype.reduce_concat


def test_sample_genotype_first_node_reads_both_inputs():
  rng = np.random.default_rng(1)
  for steps in (1, 2, 4):
    genotype = sampler_lib.sample_genotype(rng, steps=steps)
    assert len(genotype.normal) == 2 * steps
    assert sorted(j for _, j in genotype.normal[:2]) == [0, 1]
    for step in range(steps):
      pair = genotype.normal[2 * step : 2 * step + 2]
      assert pair[0][1] != pair[1][1]  # Two distinct input states.


def test_sample_genotype_rejects_zero_steps():
  with pytest.raises(ValueError, match="steps=0"):
    sampler_lib.sample_genotype(np.random.default_rng(0), steps=0)


def test_genotype_rejection_rules():
  def reject(normal):
    genotype = genotypes_lib.Genotype(normal, (2, 3), normal, (2, 3))
    return sampler_lib.genotype_rejection(genotype)

  pools = (("max_pool_3x3", 0), ("avg_pool_3x3", 1))
  assert reject(pools + (("skip_connect", 0), ("none", 2))) == (
    "no learnable operation"
  )
  assert reject(pools + (("cse", 0), ("none", 2))) == "cse without conv"
  assert reject((("cse", 0), ("cse", 1), ("conv_1x1", 0), ("none", 2))) == (
    "two cse in a cell"
  )
  assert reject((("conv_5x5", 0), ("conv_7x7", 1)) + pools) == (
    "two large convs in a cell"
  )
  assert reject((("msa", 0), ("conv_3x3", 1)) + pools) is None


@pytest.mark.parametrize("split", sampler_lib.SPLITS)
def test_split_ranges(split):
  settings = sampler_lib.split_settings(split)
  rejections = collections.Counter()
  rng = sampler_lib.split_rng(split, seed=0)
  archs = list(sampler_lib.sample_architectures(split, 60, rng, rejections))
  for arch in archs:
    config = arch.config
    assert settings.min_cells <= config.num_cells <= settings.max_cells
    assert settings.min_steps <= config.steps <= settings.max_steps
    assert config.channels == sampler_lib.GENERATOR_CHANNELS
    assert arch.num_params_cifar <= settings.max_params
    assert arch.num_params_imagenet <= settings.max_params
    assert arch.num_params_cifar == plan_lib.count_params(
      config, include_dead=True
    )
    assert sampler_lib.genotype_rejection(config.genotype) is None
    if settings.norm == "none":
      assert config.norm is None
    if settings.norm == "bn":
      assert config.norm == "bn"
  if split == "dense":
    assert max(a.config.steps for a in archs) > 4
  if split == "deep":
    assert max(a.config.num_cells for a in archs) > 18


def test_training_width_rules():
  rng = np.random.default_rng(0)
  config = _configs("train", 1, seed=0)[0].replace(
    num_cells=6, global_pooling=True, genotype=genotypes_lib.DARTS
  )
  # Over 0.8M parameters at generator width: always 32 channels.
  for _ in range(20):
    channels, fc_dim = sampler_lib.sample_training_width(config, 900_000, rng)
    assert channels == 32
    assert fc_dim in (64, 128, 192, 256)
  # Between 0.2M and 0.4M: up to 64 channels.
  draws = {
    sampler_lib.sample_training_width(config, 300_000, rng)[0]
    for _ in range(100)
  }
  assert draws == {32, 48, 64}
  # Small networks: all widths, and fc_dim above 256 for C <= 64.
  draws = [
    sampler_lib.sample_training_width(config, 50_000, rng) for _ in range(400)
  ]
  assert {c for c, _ in draws} == set(sampler_lib.TRAIN_CHANNELS)
  assert max(f for c, f in draws if c <= 64) > 256
  assert max(f for c, f in draws if c > 64) <= 256
  # A flattening head forces 32 channels.
  flat = config.replace(global_pooling=False)
  assert sampler_lib.sample_training_width(flat, 50_000, rng)[0] == 32


def test_predefined_configs_build():
  for imagenet in (False, True):
    for name, config in sampler_lib.predefined_configs(imagenet).items():
      assert plan_lib.count_params(config) > 0, name
  vit = sampler_lib.predefined_configs()["ViT"]
  assert vit.vit
  assert vit.channels == 128
  assert vit.num_cells == 12


# Dataset on disk


def test_encode_decode_round_trip():
  configs = _configs("dense", 5, seed=2) + list(
    sampler_lib.predefined_configs().values()
  )
  arrays = dataset_lib.encode_configs(configs)
  for row, config in enumerate(configs):
    assert dataset_lib.decode_config(arrays, row) == config


def test_generate_split_writes_sampler_output(tmp_path):
  directory = str(tmp_path / "val")
  dataset_lib.generate_split(
    directory, "val", 7, seed=3, shard_size=3, progress=False
  )
  assert sorted(os.listdir(directory)) == [
    "meta.json",
    "shard_00000.npz",
    "shard_00001.npz",
    "shard_00002.npz",
  ]
  data = dataset_lib.ArchitectureDataset(directory)
  assert len(data) == 7
  expected = (
    _configs("val", 3, 3, shard=0)
    + _configs("val", 3, 3, shard=1)
    + _configs("val", 1, 3, shard=2)
  )
  assert [data[i] for i in range(7)] == expected
  assert data.num_params(0) == plan_lib.count_params(
    expected[0], include_dead=True
  )
  assert data.num_nodes is None
  with pytest.raises(IndexError, match="7"):
    data.config(7)


def test_generate_split_resumes_missing_shard(tmp_path):
  directory = str(tmp_path / "train")
  dataset_lib.generate_split(
    directory, "train", 6, shard_size=2, progress=False
  )
  first = dataset_lib.ArchitectureDataset(directory)
  kept = os.path.join(directory, "shard_00000.npz")
  kept_mtime = os.path.getmtime(kept)
  os.remove(os.path.join(directory, "shard_00001.npz"))
  with pytest.raises(ValueError, match="shard_00001.npz"):
    dataset_lib.ArchitectureDataset(directory)

  time.sleep(0.01)
  dataset_lib.generate_split(
    directory, "train", 6, shard_size=2, progress=False
  )
  assert os.path.getmtime(kept) == kept_mtime  # Finished shards are kept.
  second = dataset_lib.ArchitectureDataset(directory)
  assert [second[i] for i in range(6)] == [first[i] for i in range(6)]
  assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_generate_split_rejects_other_settings(tmp_path):
  directory = str(tmp_path / "test")
  dataset_lib.generate_split(directory, "test", 2, progress=False)
  with pytest.raises(ValueError, match="dataset with other settings"):
    dataset_lib.generate_split(directory, "test", 2, seed=5, progress=False)
  with pytest.raises(ValueError, match="'nope'"):
    dataset_lib.generate_split(directory, "nope", 2, progress=False)


def test_dataset_missing_directory_raises(tmp_path):
  with pytest.raises(ValueError, match="meta.json"):
    dataset_lib.ArchitectureDataset(str(tmp_path))


def test_generate_split_in_parallel_matches_serial(tmp_path):
  serial = str(tmp_path / "serial")
  parallel = str(tmp_path / "parallel")
  dataset_lib.generate_split(serial, "train", 4, shard_size=2, progress=False)
  dataset_lib.generate_split(
    parallel, "train", 4, shard_size=2, num_workers=2, progress=False
  )
  a = dataset_lib.ArchitectureDataset(serial)
  b = dataset_lib.ArchitectureDataset(parallel)
  assert [a[i] for i in range(4)] == [b[i] for i in range(4)]


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("wide"))
  dataset_lib.generate_split(
    directory, "wide", 5, seed=1, shard_size=5, progress=False
  )
  return dataset_lib.ArchitectureDataset(directory)


def test_wide_dataset_items_are_widened(wide_dataset):
  for i in range(len(wide_dataset)):
    assert wide_dataset[i].channels == (
      sampler_lib.WIDE_FACTOR_CIFAR * wide_dataset.config(i).channels
    )


def test_meta_batches_eval_walks_split_once(wide_dataset):
  batches = list(
    dataset_lib.meta_batches(
      wide_dataset, 2, np.random.default_rng(0), train=False
    )
  )
  assert [[i for i, _ in b] for b in batches] == [[0, 1], [2, 3], [4]]
  assert batches[0][0][1] == wide_dataset[0]


def test_meta_batches_train_redraws_widths(wide_dataset):
  loader = dataset_lib.meta_batches(
    wide_dataset, 5, np.random.default_rng(0), train=True
  )
  seen = collections.defaultdict(set)
  for _ in range(40):
    batch = next(loader)
    assert sorted(i for i, _ in batch) == list(range(5))
    for i, config in batch:
      assert config.channels in sampler_lib.TRAIN_CHANNELS
      assert config.genotype == wide_dataset.config(i).genotype
      seen[i].add((config.channels, config.fc_dim))
  assert max(len(v) for v in seen.values()) > 1


def test_meta_batches_rejects_bad_arguments(wide_dataset):
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="batch_size=0"):
    next(dataset_lib.meta_batches(wide_dataset, 0, rng))
  with pytest.raises(ValueError, match="max_nodes"):
    next(dataset_lib.meta_batches(wide_dataset, 2, rng, max_nodes=100))


def test_background_loader_prefetches_and_maps():
  produced = []

  def source():
    for i in range(6):
      produced.append(i)
      yield i

  with dataset_lib.BackgroundLoader(
    source(), map_fn=lambda x: x * 10, buffer_size=2
  ) as loader:
    time.sleep(0.2)
    # The producer ran ahead of the consumer, bounded by the buffer.
    assert 2 <= len(produced) <= 4
    assert list(loader) == [0, 10, 20, 30, 40, 50]


def test_background_loader_raises_producer_error():
  def source():
    yield 1
    raise RuntimeError("sampling failed")

  loader = dataset_lib.BackgroundLoader(source())
  assert next(loader) == 1
  with pytest.raises(RuntimeError, match="sampling failed"):
    next(loader)
  loader.close()


def test_background_loader_empty_source():
  assert list(dataset_lib.BackgroundLoader(iter(()))) == []


def test_stored_graphs_match_built_graphs(tmp_path):
  graph_deepnets = pytest.importorskip("ghn_jax.graph_deepnets")
  directory = str(tmp_path / "graphs")
  dataset_lib.generate_split(
    directory,
    "val",
    4,
    shard_size=2,
    graph_fn=dataset_lib.build_network_graph,
    progress=False,
  )
  data = dataset_lib.ArchitectureDataset(directory)
  for i in range(len(data)):
    stored = data.graph(i)
    built = graph_deepnets.build_deepnets_graph(data.config(i))
    stored.validate()
    assert data.num_nodes[i] == built.num_nodes
    # Node rows and edges come from one graph, in one node order.
    np.testing.assert_array_equal(stored.node_ops, built.node_ops)
    np.testing.assert_array_equal(stored.node_shapes, built.node_shapes)
    np.testing.assert_array_equal(stored.node_param_perm, built.node_param_perm)
    np.testing.assert_array_equal(stored.senders, built.senders)
    np.testing.assert_array_equal(stored.receivers, built.receivers)
    assert stored.node_params == built.node_params
    assert stored.node_extra_params == built.node_extra_params

  # Batches over the node cap are dropped.
  cap = int(np.sort(data.num_nodes)[:2].sum())
  loader = dataset_lib.meta_batches(
    data, 2, np.random.default_rng(0), max_nodes=cap
  )
  for _ in range(10):
    batch = next(loader)
    assert data.num_nodes[[i for i, _ in batch]].sum() <= cap
  with pytest.raises(ValueError, match=f"max_nodes={cap - 1}"):
    next(
      dataset_lib.meta_batches(
        data, 2, np.random.default_rng(0), max_nodes=cap - 1
      )
    )


def test_graph_of_split_without_graphs_raises(wide_dataset):
  with pytest.raises(ValueError, match="no stored graphs"):
    wide_dataset.graph(0)


def test_generate_nets_command(tmp_path):
  out = tmp_path / "cmd"
  script = os.path.join(
    os.path.dirname(__file__), "..", "experiments", "generate_nets.py"
  )
  result = subprocess.run(
    [
      sys.executable,
      script,
      "--split",
      "bnfree",
      "--num",
      "3",
      "--seed",
      "4",
      "--workers",
      "1",
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "3 bnfree architectures" in result.stdout
  data = dataset_lib.ArchitectureDataset(str(out))
  assert len(data) == 3
  assert all(data[i].norm is None for i in range(3))
  assert data.meta["seed"] == 4
