"""End-to-end: a GHN predicts every parameter of zoo models that then run."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from ghn_jax import ghn as ghn_lib
from ghn_jax import graph_builder, zoo

FAST_MODELS = ("mlp", "mobilenet", "vit")
SLOW_MODELS = ("resnet18", "darts", "resnet50", "convnext_tiny")


@pytest.fixture(scope="module")
def ghn_and_params():
  return ghn_lib.init_ghn(ghn_lib.ghn2_config(), jax.random.key(0))


def _check_model(name, ghn_and_params):
  ghn, ghn_params = ghn_and_params
  model, input_shape = zoo.create_model(name)
  images = np.asarray(
    jax.random.normal(jax.random.key(1), input_shape), np.float32
  )
  variables = model.init(jax.random.key(2), images)
  graph = graph_builder.build_graph(model, variables, input_shape=input_shape)
  params = ghn_lib.predict_params(
    ghn, ghn_params, graph, params_template=variables["params"]
  )

  flat_params = traverse_util.flatten_dict(params)
  flat_template = traverse_util.flatten_dict(variables["params"])
  assert flat_params.keys() == flat_template.keys()
  for path, value in flat_params.items():
    assert value.shape == flat_template[path].shape, path
    assert np.all(np.isfinite(value)), path
  predicted = {p for p in graph.node_params if p} | {
    p for p in graph.node_extra_params if p
  }
  assert predicted == {"/".join(path) for path in flat_template}

  output = model.apply(
    {**variables, "params": params}, images, mutable=["batch_stats"]
  )
  logits = output[0] if isinstance(output, tuple) else output
  logits = np.asarray(logits)
  assert logits.shape == (input_shape[0], 10)
  assert np.all(np.isfinite(logits))
  # Predicted parameters are not the template's: the GHN wrote them.
  changed = [
    path
    for path, value in flat_params.items()
    if not np.array_equal(value, flat_template[path])
  ]
  assert len(changed) == len(flat_params)


@pytest.mark.parametrize("name", FAST_MODELS)
def test_predicted_zoo_model_runs(name, ghn_and_params):
  _check_model(name, ghn_and_params)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_predicted_large_zoo_model_runs(name, ghn_and_params):
  _check_model(name, ghn_and_params)
