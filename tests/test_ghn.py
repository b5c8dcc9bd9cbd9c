"""Unit tests of the Flax GHN: shape lookup, sweeps, decoding, API, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghn_jax import ghn as ghn_lib
from ghn_jax import ghn_inputs, graph_builder
from ghn_jax import graph as graph_lib

CONV = graph_lib.PRIMITIVE_INDEX["conv"]
BN = graph_lib.PRIMITIVE_INDEX["bn"]
BIAS = graph_lib.PRIMITIVE_INDEX["bias"]
SUM = graph_lib.PRIMITIVE_INDEX["sum"]
INPUT = graph_lib.PRIMITIVE_INDEX["input"]
MAX_POOL = graph_lib.PRIMITIVE_INDEX["max_pool"]


@pytest.fixture(scope="module")
def ghn2():
  return ghn_lib.init_ghn(ghn_lib.ghn2_config(), jax.random.key(0))


def make_spec(ops, shapes, edges, params=None, cutoff=50):
  """A GraphSpec from op indices, shapes, real edges; virtual edges added."""
  n = len(ops)
  senders = np.array([e[0] for e in edges], np.int64)
  receivers = np.array([e[1] for e in edges], np.int64)
  senders, receivers, weight = graph_lib.virtual_edges(
    senders, receivers, n, cutoff
  )
  shapes = np.array([list(s) + [0] * (4 - len(s)) for s in shapes], np.int64)
  if params is None:
    params = tuple(f"p{i}" if shapes[i].any() else "" for i in range(n))
  return ghn_inputs.GraphSpec(
    node_ops=np.array(ops),
    node_shapes=shapes,
    senders=senders,
    receivers=receivers,
    edge_weight=weight,
    node_params=tuple(params),
    node_extra_params=("",) * n,
    node_param_perm=np.tile(np.arange(4), (n, 1)),
    node_is_bias=np.array([p.endswith("bias") for p in params]),
  )


def random_spec(rng: np.random.Generator, n: int) -> ghn_inputs.GraphSpec:
  """A random DAG with conv/bn/sum nodes, classifier weight and bias last."""
  edges = [(i, i + 1) for i in range(n - 1)]
  for _ in range(n):
    a, b = sorted(rng.choice(n, 2, replace=False))
    edges.append((int(a), int(b)))
  edges = sorted(set(edges))
  ops, shapes = [INPUT], [()]
  for _ in range(1, n - 2):
    kind = rng.integers(3)
    if kind == 0:
      c_out, c_in = rng.choice([3, 8, 16, 24, 64, 96]), rng.choice([1, 3, 16])
      k = rng.choice([1, 3, 5])
      ops.append(CONV)
      shapes.append((c_out, c_in, k, k))
    elif kind == 1:
      ops.append(BN)
      shapes.append((rng.choice([16, 100]),))
    else:
      ops.append(SUM)
      shapes.append(())
  ops += [CONV, BIAS]
  shapes += [(10, 64), (10,)]
  return make_spec(ops, shapes, edges)


def sequential_embeddings(variables, spec, config) -> np.ndarray:
  """Node-by-node gated GNN in NumPy, written from the GHN-2 paper's Eq. 3-4.

  Serves as an independent check of the level-parallel scan.
  """
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  idx = ghn_inputs.shape_indices(
    spec.node_shapes, config.num_classes, config.max_shape[3]
  )
  ch = p["shape_channel_embed"]["embedding"]
  sp = p["shape_spatial_embed"]["embedding"]
  h = p["op_embed"]["embedding"][spec.node_ops] + np.concatenate(
    [ch[idx[:, 0]], ch[idx[:, 1]], sp[idx[:, 2]], sp[idx[:, 3]]], axis=1
  )

  def mlp(layers, x):
    for i in range(len(layers)):
      layer = layers[f"dense_{i}"]
      x = np.maximum(x @ layer["kernel"] + layer["bias"], 0)
    return x

  def gru(m, hv):
    g = p["gru"]
    gi = m @ g["input_kernel"] + g["input_bias"]
    gh = hv @ g["hidden_kernel"] + g["hidden_bias"]
    sig = lambda v: 1 / (1 + np.exp(-v))
    r = sig(gi[:32] + gh[:32])
    z = sig(gi[32:64] + gh[32:64])
    nn_ = np.tanh(gi[64:] + r * gh[64:])
    return (1 - z) * nn_ + z * hv

  s, r, w = spec.senders, spec.receivers, spec.edge_weight
  n = spec.num_nodes
  for src, dst, order in ((s, r, range(n)), (r, s, range(n - 1, -1, -1))):
    for v in order:
      m = np.zeros(32, np.float32)
      for u, d in zip(src[dst == v], w[dst == v], strict=True):
        if d == 1:
          m += mlp(p["message_mlp"], h[u])
        m += mlp(p["virtual_message_mlp"], h[u]) / d
      h[v] = gru(m, h[v])
  ln = p["layer_norm"]
  mu = h.mean(-1, keepdims=True)
  var = h.var(-1, keepdims=True)
  return (h - mu) / np.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]


# --- shape encoder -----------------------------------------------------------


@pytest.mark.parametrize(
  "value, expected",
  [
    (1, 1),
    (3, 3),
    (4, 8),
    (7, 8),
    (2, 1),
    (12, 10),
    (100, 96),
    (8192, 8192),
    (9000, 8192),
    (4104, 4096),
    (4112, 4096),
    (4113, 4128),
  ],
)
def test_channel_lookup(value, expected):
  channels, _ = ghn_inputs.shape_tables(10, 11)
  index = ghn_inputs.shape_indices(np.array([[value, 0, 0, 0]]), 10, 11)
  assert channels[index[0, 0]] == expected


@pytest.mark.parametrize(
  "value, expected",
  [(1, 1), (2, 3), (4, 3), (12, 11), (13, 14), (15, 14), (16, 16), (40, 16)],
)
def test_spatial_lookup(value, expected):
  _, spatial = ghn_inputs.shape_tables(10, 11)
  index = ghn_inputs.shape_indices(np.array([[8, 8, value, value]]), 10, 11)
  assert spatial[index[0, 2]] == expected
  assert spatial[index[0, 3]] == expected


def test_shape_lookup_dummy_and_small_num_classes():
  channels, spatial = ghn_inputs.shape_tables(5, 11)
  index = ghn_inputs.shape_indices(
    np.array([[0, 0, 0, 0], [5, 0, 0, 0]]), 5, 11
  )
  dummy = [len(channels), len(channels), len(spatial), len(spatial)]
  assert index[0].tolist() == dummy
  # 5 is in the table (num_classes) but 4..7 still map to 8, as originally.
  assert channels[index[1, 0]] == 8


def test_shape_to_4d():
  assert ghn_inputs.shape_to_4d((7,)) == (7, 1, 1, 1)
  assert ghn_inputs.shape_to_4d((7, 3)) == (7, 3, 1, 1)
  assert ghn_inputs.shape_to_4d((1, 197, 768)) == (1, 768, 14, 14)
  assert ghn_inputs.shape_to_4d((2, 3, 4)) == (2, 3, 4, 1)


def test_shape_with_five_dims_raises():
  with pytest.raises(ValueError, match="5 dimensions"):
    ghn_inputs.shape_to_4d((1, 2, 3, 4, 5))
  with pytest.raises(ValueError, match="more than 4"):
    ghn_inputs.shape_indices(np.zeros((2, 5), np.int64), 10, 11)


# --- gated GNN ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_level_scan_matches_sequential_sweep(ghn2, seed):
  ghn, variables = ghn2
  spec = random_spec(np.random.default_rng(seed), 24)
  inputs, _ = ghn_lib.prepare_inputs(ghn.config, [spec])
  got = ghn_lib.apply_jit(ghn, variables, inputs)["x_final"][:24]
  expected = sequential_embeddings(variables, spec, ghn.config)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_one_node_graph_with_and_without_jit(ghn2):
  ghn, variables = ghn2
  spec = make_spec([BIAS], [(10,)], [], params=("head/bias",))
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  jitted = ghn_lib.apply_jit(ghn, variables, inputs)
  eager = ghn.apply(variables, inputs)
  np.testing.assert_allclose(jitted["x_final"], eager["x_final"], atol=1e-6)
  expected = sequential_embeddings(variables, spec, ghn.config)
  np.testing.assert_allclose(jitted["x_final"][:1], expected, atol=1e-5)
  for outputs in (jitted, eager):
    params = ghn_lib.assemble_params(jax.device_get(outputs), plans[0], np)
    bias = params["head"]["bias"]
    assert bias.shape == (10,)
    # A lone 1-D node is the last node: the classifier-bias decoder, whose
    # biases are normalised by tanh into (-1, 1).
    assert np.all(np.abs(bias) < 1)


def test_graph_without_edges(ghn2):
  ghn, variables = ghn2
  spec = make_spec([CONV, CONV, BIAS], [(8, 3, 3, 3), (10, 8), (10,)], [])
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  out = ghn_lib.apply_jit(ghn, variables, inputs)
  expected = sequential_embeddings(variables, spec, ghn.config)
  np.testing.assert_allclose(out["x_final"][:3], expected, atol=1e-5)
  params = ghn_lib.assemble_params(jax.device_get(out), plans[0], np)
  assert {k: v.shape for k, v in params.items()} == {
    "p0": (8, 3, 3, 3),
    "p1": (10, 8),
    "p2": (10,),
  }


def test_nodes_without_params_predict_nothing(ghn2):
  ghn, variables = ghn2
  spec = make_spec(
    [INPUT, MAX_POOL, CONV, BIAS],
    [(), (1, 1, 3, 3), (10, 16), (10,)],
    [(0, 1), (1, 2), (2, 3)],
    params=("", "", "w", "b"),
  )
  _, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  assert [p.path for p in plans[0]] == ["w", "b"]
  assert [p.kind for p in plans[0]] == ["class_weight", "class_bias"]


def test_padding_and_batching_do_not_change_results(ghn2):
  ghn, variables = ghn2
  rng = np.random.default_rng(3)
  specs = [random_spec(rng, n) for n in (9, 30)]
  batch_in, batch_plans = ghn_lib.prepare_inputs(ghn.config, specs)
  batch_out = jax.device_get(ghn_lib.apply_jit(ghn, variables, batch_in))
  for i, spec in enumerate(specs):
    one_in, one_plans = ghn_lib.prepare_inputs(ghn.config, [spec])
    one_out = jax.device_get(ghn_lib.apply_jit(ghn, variables, one_in))
    alone = ghn_lib.assemble_params(one_out, one_plans[0], np)
    batched = ghn_lib.assemble_params(batch_out, batch_plans[i], np)
    assert sorted(alone) == sorted(batched)
    for key in alone:
      np.testing.assert_allclose(alone[key], batched[key], atol=1e-6)


def test_graphs_of_one_bucket_compile_once():
  # The jitted functions are cached per config and shared by every test that
  # uses it: this hidden size is used by no other test, so the counts below
  # are this test's own programs whatever ran before.
  config = ghn_lib.ghn2_config(hid=12)
  ghn, variables = ghn_lib.init_ghn(config, jax.random.key(1))
  embed, decode = ghn_lib._jitted_apply(config)
  for n in (20, 21, 22):
    ops = [CONV] * (n - 2) + [CONV, BIAS]
    shapes = [(16, 16, 3, 3)] * (n - 2) + [(10, 16), (10,)]
    spec = make_spec(ops, shapes, [(i, i + 1) for i in range(n - 1)])
    inputs, _ = ghn_lib.prepare_inputs(config, [spec])
    jax.block_until_ready(ghn_lib.apply_jit(ghn, variables, inputs))
  assert embed._cache_size() == 1
  assert decode._cache_size() == 1


def test_ghn1_ignores_virtual_edges():
  config = ghn_lib.ghn1_config()
  ghn, variables = ghn_lib.init_ghn(config, jax.random.key(2))
  assert "virtual_message_mlp" not in variables["params"]
  spec = random_spec(np.random.default_rng(0), 16)
  real = spec.edge_weight == 1
  no_virtual = ghn_inputs.GraphSpec(
    **{
      **spec.__dict__,
      "senders": spec.senders[real],
      "receivers": spec.receivers[real],
      "edge_weight": spec.edge_weight[real],
    }
  )
  a = ghn_lib.apply_jit(
    ghn, variables, ghn_lib.prepare_inputs(config, [spec])[0]
  )
  b = ghn_lib.apply_jit(
    ghn, variables, ghn_lib.prepare_inputs(config, [no_virtual])[0]
  )
  np.testing.assert_allclose(a["x_final"], b["x_final"], atol=1e-6)


def test_mlp_ghn_ignores_edges():
  config = ghn_lib.mlp_ghn_config()
  ghn, variables = ghn_lib.init_ghn(config, jax.random.key(2))
  spec = random_spec(np.random.default_rng(1), 12)
  no_edges = ghn_inputs.GraphSpec(
    **{
      **spec.__dict__,
      "senders": spec.senders[:0],
      "receivers": spec.receivers[:0],
      "edge_weight": spec.edge_weight[:0],
    }
  )
  a = ghn_lib.apply_jit(
    ghn, variables, ghn_lib.prepare_inputs(config, [spec])[0]
  )
  b = ghn_lib.apply_jit(
    ghn, variables, ghn_lib.prepare_inputs(config, [no_edges])[0]
  )
  np.testing.assert_allclose(a["x_final"], b["x_final"], atol=1e-6)
  x0 = a["x_shape_enc"]
  assert not np.allclose(a["x_gnn"], x0)


def test_ablation_switches_change_embeddings():
  rng_key = jax.random.key(4)
  spec = random_spec(np.random.default_rng(2), 10)
  results = {}
  for name, config in {
    "default": ghn_lib.ghn2_config(),
    "no_shape": ghn_lib.ghn2_config(shape_encoder=False),
    "two_sweeps": ghn_lib.ghn2_config(num_sweeps=2),
  }.items():
    ghn, variables = ghn_lib.init_ghn(config, rng_key)
    inputs, _ = ghn_lib.prepare_inputs(config, [spec])
    results[name] = np.asarray(
      ghn_lib.apply_jit(ghn, variables, inputs)["x_gnn"]
    )
  assert not np.allclose(results["default"], results["no_shape"])
  assert not np.allclose(results["default"], results["two_sweeps"])


# --- decoding ----------------------------------------------------------------


def test_conv_prediction_tiles_with_period_of_max_shape(ghn2):
  ghn, variables = ghn2
  spec = make_spec(
    [CONV, CONV, CONV, BIAS],
    [(130, 70, 3, 3), (5, 5, 13, 13), (10, 8), (10,)],
    [(0, 1), (1, 2), (2, 3)],
  )
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  out = jax.device_get(ghn_lib.apply_jit(ghn, variables, inputs))
  params = ghn_lib.assemble_params(out, plans[0], np)
  w = params["p0"]
  assert w.shape == (130, 70, 3, 3)
  np.testing.assert_array_equal(w[64:128], w[:64])
  np.testing.assert_array_equal(w[:, 64:], w[:, :6])
  # 13x13 kernels exceed the 11x11 decoder: tiled periodically.
  k = params["p1"]
  np.testing.assert_array_equal(k[:, :, 11:, :], k[:, :, :2, :])
  np.testing.assert_array_equal(k[:, :, :, 11:], k[:, :, :, :2])


def test_fan_in_normalisation(ghn2):
  ghn, variables = ghn2
  shapes = [(16, 16, 3, 3), (16, 1, 3, 3), (16, 16, 1, 3), (10, 16), (10,)]
  names = ("p0", "p1", "p2", "p3", "p4/bias")
  edges = [(i, i + 1) for i in range(4)]
  spec = make_spec([CONV] * 4 + [BIAS], shapes, edges, params=names)

  raw_config = ghn_lib.ghn2_config(weight_norm=False)
  norm_in, plans = ghn_lib.prepare_inputs(ghn.config, [spec])
  raw_in, raw_plans = ghn_lib.prepare_inputs(raw_config, [spec])
  norm = ghn_lib.assemble_params(
    jax.device_get(ghn_lib.apply_jit(ghn, variables, norm_in)), plans[0], np
  )
  raw = ghn_lib.assemble_params(
    jax.device_get(
      ghn_lib.apply_jit(ghn_lib.GHN(raw_config), variables, raw_in)
    ),
    raw_plans[0],
    np,
  )
  gains = {"p0": 2 / 144, "p1": 1 / 9, "p2": 1 / 48, "p3": 2 / 16}
  for key, gain in gains.items():
    np.testing.assert_allclose(norm[key], raw[key] * np.sqrt(gain), rtol=1e-5)
  np.testing.assert_allclose(
    norm["p4"]["bias"], np.tanh(0.2 * raw["p4"]["bias"]), rtol=1e-5
  )


# --- API ---------------------------------------------------------------------


class TinyCNN(nn.Module):
  """Conv-BN-ReLU, global pooling and a classifier."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(12, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(24, (1, 1))(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def tiny_cnn():
  model = TinyCNN()
  x = jnp.ones((2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  graph = graph_builder.build_graph(model, variables, input_shape=x.shape)
  return model, variables, graph, x


def test_predict_params_for_flax_model(ghn2, tiny_cnn):
  ghn, ghn_variables = ghn2
  model, variables, graph, x = tiny_cnn
  params = ghn_lib.predict_params(
    ghn, ghn_variables, graph, params_template=variables["params"]
  )
  shapes = jax.tree_util.tree_map(np.shape, params)
  assert shapes == jax.tree_util.tree_map(np.shape, variables["params"])
  logits, _ = model.apply(
    {**variables, "params": params}, x, mutable=["batch_stats"]
  )
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))


def test_template_shape_mismatch_raises(ghn2, tiny_cnn):
  ghn, ghn_variables = ghn2
  _, variables, graph, _ = tiny_cnn
  bad = jax.tree_util.tree_map(lambda a: a, variables["params"])
  bad["Dense_0"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    ghn_lib.predict_params(ghn, ghn_variables, graph, params_template=bad)


def test_gradient_through_prediction_is_finite(ghn2, tiny_cnn):
  ghn, ghn_variables = ghn2
  model, variables, graph, x = tiny_cnn
  inputs, plans = ghn_lib.prepare_inputs(ghn.config, [graph])
  labels = jnp.arange(2)

  @jax.jit
  def loss_fn(ghn_variables):
    (params,) = ghn_lib.predict_params_batch(ghn, ghn_variables, inputs, plans)
    logits, _ = model.apply(
      {**variables, "params": params}, x, mutable=["batch_stats"]
    )
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(log_probs[jnp.arange(2), labels])

  grads = jax.grad(loss_fn)(ghn_variables)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  for path, leaf in leaves:
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
  norms = {
    jax.tree_util.keystr(p): float(jnp.linalg.norm(g)) for p, g in leaves
  }
  assert norms["['params']['gru']['input_kernel']"] > 0
  assert norms["['params']['decoder_conv_out']['kernel']"] > 0


def test_node_embeddings(ghn2, tiny_cnn):
  ghn, ghn_variables = ghn2
  _, _, graph, _ = tiny_cnn
  (emb,) = ghn_lib.node_embeddings(ghn, ghn_variables, [graph])
  assert emb.shape == (graph.num_nodes, 32)


def test_save_and_load_roundtrip(tmp_path):
  config = ghn_lib.ghn1_config(hid=16, num_classes=7)
  _, variables = ghn_lib.init_ghn(config, jax.random.key(3))
  path = tmp_path / "ghn.npz"
  ghn_lib.save_ghn(str(path), config, variables)
  ghn, loaded = ghn_lib.load_ghn(str(path))
  assert ghn.config == config
  for a, b in zip(
    jax.tree_util.tree_leaves(variables),
    jax.tree_util.tree_leaves(loaded),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)


def test_load_rejects_other_npz(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, x=np.zeros(3))
  with pytest.raises(ValueError, match="not a ghn_jax GHN file"):
    ghn_lib.load_ghn(str(path))


# --- bad input ---------------------------------------------------------------


def test_unknown_op_index_raises(ghn2):
  ghn, _ = ghn2
  spec = make_spec([CONV, 15], [(8, 3, 3, 3), (8,)], [(0, 1)])
  with pytest.raises(ValueError, match="unknown op index 15 at node 1"):
    ghn_lib.prepare_inputs(ghn.config, [spec])


def test_edges_against_node_order_raise(ghn2):
  ghn, _ = ghn2
  spec = make_spec([CONV, BIAS], [(8, 3, 3, 3), (8,)], [(0, 1)])
  backward = ghn_inputs.GraphSpec(
    **{**spec.__dict__, "senders": np.array([1]), "receivers": np.array([0])}
  )
  with pytest.raises(ValueError, match="topological order"):
    ghn_lib.prepare_inputs(ghn.config, [backward])


def test_three_dim_parameter_raises(ghn2):
  ghn, _ = ghn2
  spec = make_spec([CONV, BIAS, BIAS], [(1, 5, 8), (8,), (8,)], [(0, 1)])
  with pytest.raises(ValueError, match="1-D, 2-D and 4-D"):
    ghn_lib.prepare_inputs(ghn.config, [spec])


def test_empty_inputs_raise(ghn2):
  ghn, _ = ghn2
  with pytest.raises(ValueError, match="no graphs"):
    ghn_lib.prepare_inputs(ghn.config, [])
  with pytest.raises(ValueError, match="no nodes"):
    ghn_lib.prepare_inputs(ghn.config, [make_spec([], [], [])])
  with pytest.raises(TypeError, match="expected a ghn_jax.graph.Graph"):
    ghn_lib.prepare_inputs(ghn.config, ["resnet"])


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"max_shape": (64, 64, 11)}, "max_shape"),
    ({"max_shape": (64, 64, 11, 7)}, "square kernel"),
    ({"hid": 30}, "multiple of 4"),
    ({"gnn": "gcn"}, "gnn must be"),
    ({"decoder": "mlp"}, "decoder must be"),
    ({"num_sweeps": 0}, "num_sweeps"),
  ],
)
def test_invalid_config_raises(overrides, message):
  with pytest.raises(ValueError, match=message):
    ghn_lib.GHNConfig(**overrides)


def test_unseen_shape_sizes_are_logged(caplog):
  shapes = np.array([[100, 3, 3, 3], [9000, 16, 13, 13]])
  with caplog.at_level("WARNING"):
    ghn_inputs.shape_indices(shapes, 10, 11)
  assert "(100, 96)" in caplog.text
  assert "(9000, 8192)" in caplog.text
  assert "(13, 14)" in caplog.text


def test_imagenet_config_tables_and_kernels():
  config = ghn_lib.ghn2_imagenet_config(hid=8)
  ghn, variables = ghn_lib.init_ghn(config, jax.random.key(6))
  params = variables["params"]
  # 391 channel sizes (1000 classes among them) and 10 kernel sizes, each
  # table with one dummy entry for nodes without a shape.
  assert params["shape_channel_embed"]["embedding"].shape == (392, 2)
  assert params["shape_spatial_embed"]["embedding"].shape == (11, 2)
  assert params["decoder_fc"]["kernel"].shape == (8, 32 * 16 * 16)
  spec = make_spec(
    [CONV, CONV, CONV, BIAS],
    [(8, 3, 16, 16), (8, 8, 17, 17), (1000, 8), (1000,)],
    [(0, 1), (1, 2), (2, 3)],
  )
  inputs, plans = ghn_lib.prepare_inputs(config, [spec])
  out = jax.device_get(ghn_lib.apply_jit(ghn, variables, inputs))
  predicted = ghn_lib.assemble_params(out, plans[0], np)
  assert predicted["p0"].shape == (8, 3, 16, 16)
  kernel = predicted["p1"]
  assert kernel.shape == (8, 8, 17, 17)
  np.testing.assert_array_equal(kernel[:, :, 16], kernel[:, :, 0])
  assert predicted["p2"].shape == (1000, 8)
  assert predicted["p3"].shape == (1000,)
