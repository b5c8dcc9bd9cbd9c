"""Distributions of sampled training architectures against the original's.

The reference numbers are those of 1000 architectures sampled by the
original generator (ppuda `experiments/net_generator.py`, train-split
settings, seed 0, torch 2.14, numpy 2.4): histograms of the settings,
quantiles of the parameter counts at generator width (32 channels, fc_dim
256) and one training-time width draw per network. Our 1000 architectures
come from a different random stream, so each comparison is a two-sample
test: chi-square homogeneity for histograms, a z-test for fractions, and
bootstrap standard errors for quantiles.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy import stats

from ghn_jax.deepnets1m import sampler as sampler_lib

NUM_ARCHS = 1000
SEED = 0
# Two-sample tests fail below this p-value (about 3.3 standard errors).
MIN_P_VALUE = 1e-3
MAX_Z = 3.3

REFERENCE_HISTOGRAMS = {
  "num_cells": {
    4: 61,
    5: 64,
    6: 53,
    7: 76,
    8: 52,
    9: 79,
    10: 55,
    11: 73,
    12: 66,
    13: 66,
    14: 64,
    15: 81,
    16: 71,
    17: 72,
    18: 67,
  },
  "steps": {1: 428, 2: 430, 3: 78, 4: 64},
  "batch_norm": {True: 959, False: 41},
  "stem_type": {0: 511, 1: 489},
  "stem_pool": {False: 748, True: 252},
  "num_fc_layers": {1: 500, 2: 500},
  "global_pooling": {True: 980, False: 20},
  "stem_kernel_size": {3: 354, 5: 307, 7: 339},
  "channel_multiplier": {1: 526, 2: 474},
  "preprocess": {True: 959, False: 41},
  "train_channels": {32: 833, 48: 79, 64: 45, 80: 9, 96: 13, 112: 10, 128: 11},
  # fc_dim above 256 (13 networks) pooled into one bin.
  "train_fc_dim": {64: 241, 128: 261, 192: 240, 256: 245, 320: 13},
}
# Operations over all edges of both cell types.
REFERENCE_OPS = {
  "none": 612,
  "max_pool_3x3": 894,
  "avg_pool_3x3": 841,
  "skip_connect": 865,
  "sep_conv_3x3": 381,
  "sep_conv_5x5": 384,
  "dil_conv_3x3": 372,
  "dil_conv_5x5": 383,
  "conv_1x1": 405,
  "conv_7x1_1x7": 363,
  "conv_3x3": 393,
  "conv_5x5": 260,
  "conv_7x7": 261,
  "msa": 408,
  "cse": 290,
}
# Fraction of genotypes that contain an operation.
REFERENCE_FRACTIONS = {"msa": 0.316, "cse": 0.266, "none": 0.368}
QUANTILES = (5, 25, 50, 75, 95)
REFERENCE_PARAM_QUANTILES = {
  "cifar": (74_706, 191_202, 462_138, 1_361_514, 4_072_966),
  "imagenet": (72_773, 197_158, 466_562, 1_392_526, 4_330_592),
}
# Graph nodes and real edges (the original's graphs lose most attention
# nodes under torch 2.x, about 0.4 per network, within the tolerance).
REFERENCE_GRAPH_QUANTILES = {
  "nodes": (63.95, 118, 163, 236.25, 367),
  "edges": (74, 134, 186, 274, 430.1),
}
# Bootstrap resamples for the standard errors of quantiles.
NUM_BOOTSTRAP = 200


@pytest.fixture(scope="module")
def sample():
  rng = sampler_lib.split_rng("train", SEED)
  archs = list(sampler_lib.sample_architectures("train", NUM_ARCHS, rng))
  width_rng = np.random.default_rng(SEED)
  widths = [
    sampler_lib.sample_training_width(a.config, a.num_params_cifar, width_rng)
    for a in archs
  ]
  return archs, widths


def _values(sample, name):
  archs, widths = sample
  if name == "steps":
    return [a.config.steps for a in archs]
  if name == "batch_norm":
    return [a.config.norm is not None for a in archs]
  if name == "train_channels":
    return [c for c, _ in widths]
  if name == "train_fc_dim":
    return [min(f, 320) for _, f in widths]
  return [getattr(a.config, name) for a in archs]


def _assert_same_distribution(ours: dict, reference: dict, name: str):
  keys = sorted(set(ours) | set(reference), key=str)
  table = np.array(
    [[ours.get(k, 0) for k in keys], [reference.get(k, 0) for k in keys]]
  )
  p_value = stats.chi2_contingency(table)[1]
  assert p_value > MIN_P_VALUE, (
    name,
    dict(zip(keys, table.tolist(), strict=False)),
  )


@pytest.mark.parametrize("name", sorted(REFERENCE_HISTOGRAMS))
def test_setting_histogram_matches_original(sample, name):
  counts = collections.Counter(_values(sample, name))
  _assert_same_distribution(counts, REFERENCE_HISTOGRAMS[name], name)


def test_operation_histogram_matches_original(sample):
  archs, _ = sample
  counts = collections.Counter(
    op for a in archs for op in a.config.genotype.all_ops()
  )
  _assert_same_distribution(counts, REFERENCE_OPS, "operations")


@pytest.mark.parametrize("op", sorted(REFERENCE_FRACTIONS))
def test_operation_presence_fraction(sample, op):
  archs, _ = sample
  ours = np.mean([a.config.genotype.has_op(op) for a in archs])
  reference = REFERENCE_FRACTIONS[op]
  pooled = (ours + reference) / 2
  standard_error = np.sqrt(2 * pooled * (1 - pooled) / NUM_ARCHS)
  assert abs(ours - reference) < MAX_Z * standard_error, (ours, reference)


def _assert_quantiles_match(values, reference, name):
  values = np.log(values)
  ours = np.percentile(values, QUANTILES)
  rng = np.random.default_rng(1)
  boot = np.percentile(
    rng.choice(values, (NUM_BOOTSTRAP, values.size)), QUANTILES, axis=1
  )
  # Both samples have this error; the difference has sqrt(2) times it.
  standard_error = np.sqrt(2) * boot.std(axis=1)
  assert np.all(np.abs(ours - np.log(reference)) < MAX_Z * standard_error), (
    name,
    np.exp(ours).round(),
    reference,
  )


def _param_counts(sample, name):
  archs, _ = sample
  if name == "cifar":
    return np.array([a.num_params_cifar for a in archs])
  return np.array([a.num_params_imagenet for a in archs])


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAM_QUANTILES))
def test_param_count_quantiles_match_original(sample, name):
  _assert_quantiles_match(
    _param_counts(sample, name), REFERENCE_PARAM_QUANTILES[name], name
  )


@pytest.fixture(scope="module")
def graphs(sample):
  graph_deepnets = pytest.importorskip("ghn_jax.graph_deepnets")
  archs, _ = sample
  return [graph_deepnets.build_deepnets_graph(a.config) for a in archs]


def test_graph_size_quantiles_match_original(graphs):
  nodes = np.array([g.num_nodes for g in graphs])
  edges = np.array([g.num_edges for g in graphs])
  _assert_quantiles_match(nodes, REFERENCE_GRAPH_QUANTILES["nodes"], "nodes")
  _assert_quantiles_match(edges, REFERENCE_GRAPH_QUANTILES["edges"], "edges")


def test_graphs_keep_every_attention_and_se_block(sample, graphs):
  # The original's graphs lose attention nodes (found by a positional rule
  # on the autograd graph); here every live msa/cse edge is one node.
  from ghn_jax import graph as graph_lib
  from ghn_jax.deepnets1m import plan as plan_lib

  archs, _ = sample
  for arch, graph in zip(archs[:200], graphs[:200], strict=True):
    plan = plan_lib.build_plan(arch.config)
    for op in ("msa", "cse"):
      live_edges = sum(
        live and edge_op == op
        for cell in plan.cells
        if cell.live
        for (edge_op, _), live in zip(cell.edges, cell.edge_live, strict=True)
      )
      nodes = int(np.sum(graph.node_ops == graph_lib.PRIMITIVE_INDEX[op]))
      assert nodes == live_edges, (op, arch.config.genotype)


def test_param_caps_hold(sample):
  archs, _ = sample
  cap = sampler_lib.split_settings("train").max_params
  assert max(a.num_params_cifar for a in archs) <= cap
  assert max(a.num_params_imagenet for a in archs) <= cap
