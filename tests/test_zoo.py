"""Tests of the model zoo: parameter counts, graphs, forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghn_jax import graph as graph_lib
from ghn_jax import graph_builder, zoo

OP = graph_lib.PRIMITIVE_INDEX

# Parameter counts for 10 classes. torchvision's counts (1000 classes) minus
# 990 classifier rows; CIFAR ResNets also lose 64 * 3 * (7 * 7 - 3 * 3)
# stem weights to the 3x3 stem.
EXPECTED_PARAMS = {
  "resnet18": 11_173_962,
  "resnet18_imagenet": 11_181_642,
  "resnet34": 21_282_122,
  "resnet50": 23_520_842,
  "resnet50_imagenet": 23_528_522,
  "mobilenet": 3_217_226,
  "convnext_tiny": 27_827_818,
  "darts": 3_349_342,
}
# Node counts of the original's graphs (ResNet-50: 126 nodes, 141 edges,
# 7,827 edges with virtual edges).
RESNET50_NODES, RESNET50_EDGES, RESNET50_VIRTUAL_EDGES = 126, 141, 7827


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_zoo_parameter_counts(name):
  model, shape = zoo.create_model(name, num_classes=10)
  assert zoo.count_params(model, shape) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_graph_predicts_every_parameter(name):
  model, shape = zoo.create_model(name)
  graph, report = graph_builder.build_graph_with_report(
    model, input_shape=shape, strict=True
  )
  assert report.num_predicted == report.num_params
  assert report.pruned_params == ()
  assert report.num_params == zoo.count_params(model, shape)
  # The classifier's weight and bias are the last two nodes.
  assert graph.node_ops[-1] == OP["bias"]
  assert graph.node_ops[-2] == OP["conv"]
  assert graph.node_shapes[-2, 0] == 10
  assert graph.node_ops[0] == OP["input"]
  assert np.all(graph.senders < graph.receivers)


def test_resnet50_graph_matches_original_size():
  model, shape = zoo.create_model("resnet50")
  graph = graph_builder.build_graph(model, input_shape=shape)
  assert graph.num_nodes == RESNET50_NODES
  assert graph.num_edges == RESNET50_EDGES
  senders, _, _ = graph_lib.virtual_edges(
    graph.senders, graph.receivers, graph.num_nodes
  )
  assert senders.size == RESNET50_VIRTUAL_EDGES


def test_imagenet_resnet_has_stem_pool():
  model, shape = zoo.create_model("resnet18_imagenet")
  graph = graph_builder.build_graph(model, input_shape=shape)
  assert int(np.sum(graph.node_ops == OP["max_pool"])) == 1
  np.testing.assert_array_equal(graph.node_shapes[1], [64, 3, 7, 7])


def test_vit_and_convnext_node_types():
  vit, shape = zoo.create_model("vit")
  graph = graph_builder.build_graph(vit, input_shape=shape)
  assert int(np.sum(graph.node_ops == OP["msa"])) == zoo.ViT().depth
  assert int(np.sum(graph.node_ops == OP["pos_enc"])) == 1
  convnext, shape = zoo.create_model("convnext_tiny")
  graph = graph_builder.build_graph(convnext, input_shape=shape)
  assert int(np.sum(graph.node_ops == OP["sep_conv"])) == sum(
    zoo.ConvNeXt().depths
  )
  # Layer scales are `ln` nodes without an extra (bias) parameter.
  scales = [i for i, p in enumerate(graph.node_params) if "layer_scale" in p]
  assert len(scales) == sum(zoo.ConvNeXt().depths)
  assert all(graph.node_ops[i] == OP["ln"] for i in scales)
  assert all(graph.node_extra_params[i] == "" for i in scales)


def _forward(name: str, batch: int = 2):
  model, shape = zoo.create_model(name, num_classes=7)
  x = jnp.ones((batch,) + shape[1:])
  variables = jax.jit(model.init)(jax.random.key(0), x)
  apply_fn = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
  logits, _ = apply_fn(variables, x)
  return logits


def test_zoo_forward_shapes():
  logits = _forward("mlp")
  assert logits.shape == (2, 7)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow
@pytest.mark.parametrize(
  "name", [n for n in sorted(zoo.ZOO) if "imagenet" not in n]
)
def test_zoo_forward_shapes_all(name):
  logits = _forward(name)
  assert logits.shape == (2, 7)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_unknown_zoo_model_rejected():
  with pytest.raises(ValueError, match="Unknown zoo model"):
    zoo.create_model("resnet1000")
