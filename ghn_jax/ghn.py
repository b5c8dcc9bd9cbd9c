"""Graph HyperNetwork GHN-2 in Flax (linen).

Knyazev et al., "Parameter Prediction for Unseen Deep Architectures",
NeurIPS 2021. The GHN reads a network's computational graph and predicts
all of its parameters in one forward pass:

1. node features: op-type embedding plus shape embedding (Sec. 3, "shape
   encoder");
2. a gated GNN with one forward and one backward sweep over the nodes in
   topological order (Eq. 3), messages along real edges and, in GHN-2, along
   virtual edges weighted by 1 / shortest-path distance (Eq. 4), node
   updates by a GRU cell;
3. layer norm of the node embeddings (GHN-2);
4. decoders: a convolutional decoder for 2-D and 4-D tensors and the
   classifier weight, an MLP for 1-D tensors, and a small layer for the
   classifier bias. Predictions are then normalised by fan-in (Sec. 4).

The arithmetic follows the reference implementation (ppuda, commit 4673a42)
so that its checkpoints load and its predictions are reproduced to float32
rounding. Where this code departs from it:

* nodes of one topological depth level are updated together; no edge joins
  two nodes of one level, so this is exact;
* the decoder computes only the channels and kernel positions that a tensor
  needs (the original slices by a per-group key; both give the same values);
* kernels larger than the decoder's (11x11 for CIFAR-10) are tiled
  periodically in every case, where the original tiles 2x2 in some cases and
  raises in the others.

Host-side preparation (padding, sweep schedule, decoding plan) lives in
`ghn_jax.ghn_inputs`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from ghn_jax import ghn_inputs
from ghn_jax import graph as graph_lib

Array = jax.Array
PyTree = Any

GNN_TYPES = ("gated", "mlp")
DECODER_TYPES = ("conv",)
# Layer-norm epsilon of the original (PyTorch's default).
LAYER_NORM_EPSILON = 1e-5
# Hidden widths relative to `hid`: message MLP (with virtual edges),
# decoder_1d, and the two 1x1 convolutions of the conv decoder.
_MESSAGE_DIVISOR = 2
_DECODER_1D_FACTOR = 2
_CONV_DECODER_FACTORS = (4, 8)
_NUM_SHAPE_EMBEDDINGS = 4
# Output normalisation of 1-D predictions: 2 * sigmoid(0.5 p) for norm
# weights (range [0, 2]) and tanh(0.2 p) for biases (range [-1, 1]).
_WEIGHT_SIGMOID_SCALE, _WEIGHT_RANGE = 0.5, 2.0
_BIAS_TANH_SCALE = 0.2
CIFAR10_MAX_SHAPE = (64, 64, 11, 11)
IMAGENET_MAX_SHAPE = (64, 64, 16, 16)


@dataclasses.dataclass(frozen=True)
class GHNConfig:
  """Hyper-parameters of a GHN; every component is a switch for ablations.

  Attributes:
    hid: width of node embeddings (32 in GHN-2).
    max_shape: largest (out, in, h, w) block the conv decoder predicts;
      larger tensors are tiled.
    num_classes: classes of the classifier decoders.
    gnn: `gated` (gated GNN with GRU updates) or `mlp` (no message
      passing, a 2-layer MLP per node: the MLP-GHN baseline).
    virtual_edges: use virtual edges (GHN-2, Eq. 4).
    virtual_edge_cutoff: maximum shortest-path length that gets a virtual
      edge when graphs are converted.
    layernorm: layer norm of the node embeddings before decoding.
    weight_norm: normalise predicted tensors (fan-in, sigmoid and tanh).
    num_sweeps: T, number of forward + backward sweeps of the gated GNN.
    op_embedding: add the op-type embedding to the node features.
    shape_encoder: add the shape embedding to the node features.
    decoder: `conv` (the only decoder of the released checkpoints).
  """

  hid: int = 32
  max_shape: tuple[int, int, int, int] = CIFAR10_MAX_SHAPE
  num_classes: int = 10
  gnn: str = "gated"
  virtual_edges: bool = True
  virtual_edge_cutoff: int = graph_lib.DEFAULT_VIRTUAL_EDGE_CUTOFF
  layernorm: bool = True
  weight_norm: bool = True
  num_sweeps: int = 1
  op_embedding: bool = True
  shape_encoder: bool = True
  decoder: str = "conv"

  def __post_init__(self):
    object.__setattr__(self, "max_shape", tuple(int(s) for s in self.max_shape))
    if len(self.max_shape) != 4 or min(self.max_shape) < 1:
      raise ValueError(
        f"max_shape must be 4 positive sizes (out, in, h, w), got "
        f"{self.max_shape}."
      )
    if self.max_shape[2] != self.max_shape[3]:
      raise ValueError(
        f"max_shape must have a square kernel, got {self.max_shape}."
      )
    if self.hid < _NUM_SHAPE_EMBEDDINGS or self.hid % _NUM_SHAPE_EMBEDDINGS:
      raise ValueError(f"hid must be a positive multiple of 4, got {self.hid}.")
    if self.gnn not in GNN_TYPES:
      raise ValueError(f"gnn must be one of {GNN_TYPES}, got {self.gnn!r}.")
    if self.decoder not in DECODER_TYPES:
      raise ValueError(
        f"decoder must be one of {DECODER_TYPES}, got {self.decoder!r}."
      )
    if self.num_classes < 1 or self.num_sweeps < 1:
      raise ValueError(
        "num_classes and num_sweeps must be >= 1, got "
        f"{self.num_classes} and {self.num_sweeps}."
      )

  @property
  def uses_virtual_edges(self) -> bool:
    """Whether messages along virtual edges are computed."""
    return self.gnn == "gated" and self.virtual_edges

  def decoder_sizes(self) -> ghn_inputs.DecoderSizes:
    return ghn_inputs.DecoderSizes(
      max_shape=self.max_shape,
      num_classes=self.num_classes,
      weight_norm=self.weight_norm,
      virtual_edges=self.uses_virtual_edges,
    )

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> GHNConfig:
    """Parse a config written by `to_json`.

    Raises:
      ValueError: if the text names unknown fields.
    """
    values = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown GHN config fields {unknown}; known: {known}")
    return cls(**values)


def ghn2_config(**overrides: Any) -> GHNConfig:
  """GHN-2 (CIFAR-10): virtual edges, layer norm, normalised predictions."""
  return GHNConfig(**overrides)


def ghn2_imagenet_config(**overrides: Any) -> GHNConfig:
  """GHN-2 for ImageNet: 1000 classes, 16x16 maximum kernel."""
  values = dict(num_classes=1000, max_shape=IMAGENET_MAX_SHAPE)
  return GHNConfig(**{**values, **overrides})


def ghn1_config(**overrides: Any) -> GHNConfig:
  """GHN-1: no virtual edges, no layer norm, no normalisation."""
  values = dict(virtual_edges=False, layernorm=False, weight_norm=False)
  return GHNConfig(**{**values, **overrides})


def mlp_ghn_config(**overrides: Any) -> GHNConfig:
  """MLP-GHN: a per-node MLP instead of message passing (GHN-1 otherwise)."""
  values = dict(
    gnn="mlp", virtual_edges=False, layernorm=False, weight_norm=False
  )
  return GHNConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------
# Parameter holders. Computation happens in pure functions below, so that the
# sweeps can run inside `lax.scan` without lifting modules.


def _torch_uniform(fan_in: int) -> Callable:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Linear/GRU default."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class _Dense(nn.Module):
  """Kernel (in, out) and bias of a dense layer."""

  features_in: int
  features_out: int

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    init = _torch_uniform(self.features_in)
    return {
      "kernel": self.param(
        "kernel", init, (self.features_in, self.features_out)
      ),
      "bias": self.param("bias", init, (self.features_out,)),
    }


class _MLP(nn.Module):
  """Parameters of a stack of dense layers."""

  features: tuple[int, ...]

  @nn.compact
  def __call__(self) -> list[dict[str, Array]]:
    return [
      _Dense(n_in, n_out, name=f"dense_{i}")()
      for i, (n_in, n_out) in enumerate(
        zip(self.features[:-1], self.features[1:], strict=True)
      )
    ]


class _Table(nn.Module):
  """An embedding table initialised N(0, 1) like PyTorch's."""

  num_embeddings: int
  features: int

  @nn.compact
  def __call__(self) -> Array:
    return self.param(
      "embedding",
      nn.initializers.normal(1.0),
      (self.num_embeddings, self.features),
    )


class _GRU(nn.Module):
  """GRU cell parameters in PyTorch's gate order (r, z, n)."""

  features: int

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    init = _torch_uniform(self.features)
    h3 = 3 * self.features
    return {
      "input_kernel": self.param("input_kernel", init, (self.features, h3)),
      "input_bias": self.param("input_bias", init, (h3,)),
      "hidden_kernel": self.param("hidden_kernel", init, (self.features, h3)),
      "hidden_bias": self.param("hidden_bias", init, (h3,)),
    }


# ---------------------------------------------------------------------------
# Pure computations.


def _mlp_apply(layers: list[dict], x: Array, final_relu: bool = True) -> Array:
  for i, layer in enumerate(layers):
    x = x @ layer["kernel"] + layer["bias"]
    if final_relu or i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def _gru_apply(p: dict[str, Array], inputs: Array, h: Array) -> Array:
  """PyTorch GRUCell: h' = (1 - z) * n + z * h."""
  gi = inputs @ p["input_kernel"] + p["input_bias"]
  gh = h @ p["hidden_kernel"] + p["hidden_bias"]
  i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
  h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
  r = jax.nn.sigmoid(i_r + h_r)
  z = jax.nn.sigmoid(i_z + h_z)
  n = jnp.tanh(i_n + r * h_n)
  return (1.0 - z) * n + z * h


def _gated_gnn(h: Array, gnn: dict, inputs: dict, num_sweeps: int) -> Array:
  """Run `num_sweeps` forward + backward sweeps (GHN-2 paper, Eq. 3-4).

  Step s of `inputs["sweep_*"]` updates the nodes of one topological level
  at once: the levels in order (forward sweep, messages along incoming
  edges), then in reverse order (backward sweep, outgoing edges). After a
  node is updated, its outgoing messages mlp(h) and mlp_ve(h) are stored,
  so later steps read them instead of recomputing the MLPs per edge. This is
  exact because every neighbour read was updated earlier in the same sweep.
  """
  message_mlp = gnn["message_mlp"]
  virtual_mlp = gnn.get("virtual_message_mlp")
  # messages[:, 0] = mlp(h) (real edges), messages[:, 1] = mlp_ve(h).
  messages = jnp.zeros((h.shape[0], 2, h.shape[1]), h.dtype)
  width = inputs["sweep_nodes"].shape[1]

  def step(carry, xs):
    h, messages = carry
    nodes, sources, targets, coef = xs
    per_edge = jnp.einsum("ec,ecd->ed", coef, messages[sources])
    m = jax.ops.segment_sum(per_edge, targets, num_segments=width)
    h_nodes = h.at[nodes].get(mode="fill", fill_value=0.0)
    h_new = _gru_apply(gnn["gru"], m, h_nodes)
    h = h.at[nodes].set(h_new, mode="drop")
    new_messages = [_mlp_apply(message_mlp, h_new)]
    if virtual_mlp is not None:
      new_messages.append(_mlp_apply(virtual_mlp, h_new))
    else:
      new_messages.append(jnp.zeros_like(h_new))
    messages = messages.at[nodes].set(
      jnp.stack(new_messages, axis=1), mode="drop"
    )
    return (h, messages), None

  xs = tuple(
    inputs[f"sweep_{k}"] for k in ("nodes", "sources", "targets", "coef")
  )
  if num_sweeps > 1:
    xs = tuple(jnp.concatenate([x] * num_sweeps) for x in xs)
  (h, _), _ = jax.lax.scan(step, (h, messages), xs)
  return h


def _normalize_rows(x: Array, weight_norm: bool) -> Array:
  """Normalise (..., 2, n) 1-D predictions: row 0 weights, row 1 biases."""
  if not weight_norm:
    return x
  weight = _WEIGHT_RANGE * jax.nn.sigmoid(_WEIGHT_SIGMOID_SCALE * x[..., 0, :])
  bias = jnp.tanh(_BIAS_TANH_SCALE * x[..., 1, :])
  return jnp.stack([weight, bias], axis=-2)


class GHN(nn.Module):
  """Graph HyperNetwork (GHN-2 by default; see `GHNConfig` for ablations).

  `__call__` takes the padded arrays of `ghn_inputs.prepare_batch` and
  returns the node embeddings and the decoder outputs; `predict_params`
  turns those into parameter pytrees.
  """

  config: GHNConfig

  def setup(self):
    cfg = self.config
    hid = cfg.hid
    channels, spatial = ghn_inputs.shape_tables(
      cfg.num_classes, cfg.max_shape[3]
    )
    quarter = hid // _NUM_SHAPE_EMBEDDINGS
    self.op_embed = _Table(ghn_inputs.NUM_OPS, hid)
    self.shape_channel_embed = _Table(len(channels) + 1, quarter)
    self.shape_spatial_embed = _Table(len(spatial) + 1, quarter)
    if cfg.gnn == "gated":
      msg_hid = hid // _MESSAGE_DIVISOR if cfg.virtual_edges else hid
      self.message_mlp = _MLP((hid, msg_hid, hid))
      if cfg.virtual_edges:
        self.virtual_message_mlp = _MLP((hid, hid // _MESSAGE_DIVISOR, hid))
      self.gru = _GRU(hid)
    else:
      self.node_mlp = _MLP((hid, hid, hid))
    if cfg.layernorm:
      self.layer_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON)
    out_ch, in_ch, kh, kw = cfg.max_shape
    c1, c2 = (f * hid for f in _CONV_DECODER_FACTORS)
    self.decoder_fc = _Dense(hid, c1 * kh * kw)
    self.decoder_conv_hidden = _Dense(c1, c2)
    self.decoder_conv_out = _Dense(c2, out_ch * in_ch)
    self.decoder_class_layer = _Dense(out_ch, cfg.num_classes)
    max_ch = max(out_ch, in_ch)
    self.decoder_1d = _MLP((hid, _DECODER_1D_FACTOR * hid, 2 * max_ch))
    self.bias_class = _Dense(max_ch, cfg.num_classes)

  def create_variables(self) -> None:
    """Create every parameter without running the GHN (for `init`)."""
    for name in (
      "op_embed",
      "shape_channel_embed",
      "shape_spatial_embed",
      "message_mlp",
      "virtual_message_mlp",
      "gru",
      "node_mlp",
      "decoder_fc",
      "decoder_conv_hidden",
      "decoder_conv_out",
      "decoder_class_layer",
      "decoder_1d",
      "bias_class",
    ):
      if hasattr(self, name):
        getattr(self, name)()
    if self.config.layernorm:
      self.layer_norm(jnp.zeros((1, self.config.hid)))

  def embed_nodes(self, inputs: dict) -> dict[str, Array]:
    """Compute node embeddings after each stage.

    Returns:
      `x_shape_enc` (GNN input), `x_gnn` (GNN output) and `x_final` (after
      layer norm: the decoders' input), each (num_nodes, hid).
    """
    cfg = self.config
    num_nodes = inputs["node_ops"].shape[0]
    x = jnp.zeros((num_nodes, cfg.hid), jnp.float32)
    if cfg.op_embedding:
      x = x + self.op_embed()[inputs["node_ops"]]
    if cfg.shape_encoder:
      ch, sp = self.shape_channel_embed(), self.shape_spatial_embed()
      idx = inputs["shape_index"]
      x = x + jnp.concatenate(
        [ch[idx[:, 0]], ch[idx[:, 1]], sp[idx[:, 2]], sp[idx[:, 3]]], axis=-1
      )
    x_shape_enc = x
    if cfg.gnn == "gated":
      gnn = {"message_mlp": self.message_mlp(), "gru": self.gru()}
      if cfg.virtual_edges:
        gnn["virtual_message_mlp"] = self.virtual_message_mlp()
      x = _gated_gnn(x, gnn, inputs, cfg.num_sweeps)
    else:
      x = _mlp_apply(self.node_mlp(), x)
    x_gnn = x
    if cfg.layernorm:
      x = self.layer_norm(x)
    return {"x_shape_enc": x_shape_enc, "x_gnn": x_gnn, "x_final": x}

  def decode(self, x: Array, inputs: dict) -> dict[str, Any]:
    """Run the decoders on the positions planned in `inputs`.

    Returns:
      A dict of arrays. `vector` (num_nodes, 2, max_ch) holds normalised
      1-D predictions, row 0 for weights and row 1 for biases.
      `class_bias` (slots, 2, num_classes) and `class_weight` (slots,
      num_classes, max_in) are the classifier predictions. `blocks` maps
      each block name `"{out}x{in}"` to an array (positions, out, in) of
      scaled conv-decoder outputs, one row per kernel position.
    """
    cfg = self.config
    out_ch, in_ch, kh, kw = cfg.max_shape
    max_ch = max(out_ch, in_ch)

    raw_1d = _mlp_apply(self.decoder_1d(), x, final_relu=False)
    raw_1d = raw_1d.reshape(-1, 2, max_ch)
    bias_class = self.bias_class()
    class_bias = raw_1d[inputs["class_bias_nodes"]]
    class_bias = jax.nn.relu(class_bias) @ bias_class["kernel"]
    class_bias = class_bias + bias_class["bias"]

    # fc layer for every node decoded by the conv decoder, then the kernel
    # positions each tensor needs.
    fc = self.decoder_fc()
    c1 = fc["bias"].shape[0] // (kh * kw)
    h_fc = x[inputs["fc_nodes"]] @ fc["kernel"] + fc["bias"]
    h_fc = jax.nn.relu(h_fc).reshape(-1, c1, kh, kw).transpose(0, 2, 3, 1)
    hidden = self.decoder_conv_hidden()
    conv_out = self.decoder_conv_out()
    out_kernel = conv_out["kernel"].reshape(-1, out_ch, in_ch)
    out_bias = conv_out["bias"].reshape(out_ch, in_ch)

    def conv_hidden(fc_index, y, xpos):
      h = h_fc[fc_index, y, xpos]
      return jax.nn.relu(h @ hidden["kernel"] + hidden["bias"])

    blocks = {}
    for name, block in inputs["blocks"].items():
      n_out, n_in = (int(s) for s in name.split("x"))
      pos = block["position"]
      h = conv_hidden(pos[:, 0], pos[:, 1], pos[:, 2])
      w = out_kernel[:, :n_out, :n_in]
      y = jnp.einsum("pk,koi->poi", h, w) + out_bias[:n_out, :n_in]
      blocks[name] = y * block["scale"][:, None, None]

    # Classifier weight: full block at kernel position (0, 0), then ReLU and
    # a 1x1 convolution over the out-channel axis.
    zeros = jnp.zeros_like(inputs["class_weight_fc"])
    h = conv_hidden(inputs["class_weight_fc"], zeros, zeros)
    full = jnp.einsum("pk,koi->poi", h, out_kernel) + out_bias
    layer = self.decoder_class_layer()
    class_weight = jnp.einsum("poi,oc->pci", jax.nn.relu(full), layer["kernel"])
    class_weight = class_weight + layer["bias"][None, :, None]
    class_weight = class_weight * inputs["class_weight_scale"][:, None, None]

    return {
      "vector": _normalize_rows(raw_1d, cfg.weight_norm),
      "class_bias": _normalize_rows(class_bias, cfg.weight_norm),
      "class_weight": class_weight,
      "blocks": blocks,
    }

  def __call__(self, inputs: dict) -> dict[str, Any]:
    """Embed the nodes and decode; returns `embed_nodes` and `decode` keys."""
    embeddings = self.embed_nodes(inputs)
    outputs = self.decode(embeddings["x_final"], inputs)
    return {**embeddings, **outputs}


# ---------------------------------------------------------------------------
# Public API.


def init_ghn(config: GHNConfig, rng: Array) -> tuple[GHN, PyTree]:
  """Build a GHN and initialise its parameters like PyTorch's defaults.

  Embeddings ~ N(0, 1); dense and GRU weights and biases
  ~ U(+-1/sqrt(fan_in)); layer-norm scale 1 and bias 0.

  Args:
    config: GHN hyper-parameters.
    rng: PRNG key.

  Returns:
    `(ghn, params)`, params being the `{'params': ...}` variables.
  """
  # Sampling on the host avoids compiling one random-number kernel per
  # parameter, which took about 10 s on a 2-core CPU. `GHN.init` draws from
  # the same distributions with JAX's generator.
  ghn, shapes = init_ghn_shapes(config)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  seed = np.asarray(rng).ravel()
  host_rng = np.random.default_rng(seed.astype(np.uint64))
  flat = traverse_util.flatten_dict(shapes)
  values = {}
  for path, leaf in sorted(flat.items()):
    module, name = path[-2], path[-1]
    siblings = {p[-1]: v for p, v in flat.items() if p[:-1] == path[:-1]}
    if name == "embedding":
      value = host_rng.standard_normal(leaf.shape)
    elif module == "layer_norm":
      value = np.ones(leaf.shape) if name == "scale" else np.zeros(leaf.shape)
    else:
      fan_in = config.hid if module == "gru" else siblings["kernel"].shape[0]
      bound = 1.0 / np.sqrt(fan_in)
      value = host_rng.uniform(-bound, bound, leaf.shape)
    values[path] = jnp.asarray(value, leaf.dtype)
  return ghn, traverse_util.unflatten_dict(values)


GraphLike = graph_lib.Graph | ghn_inputs.GraphSpec


def to_spec(config: GHNConfig, graph: GraphLike) -> ghn_inputs.GraphSpec:
  """Convert a `Graph` (adding virtual edges) or pass a `GraphSpec` through.

  Raises:
    TypeError: for other input types.
  """
  if isinstance(graph, ghn_inputs.GraphSpec):
    return graph
  if isinstance(graph, graph_lib.Graph):
    cutoff = config.virtual_edge_cutoff if config.uses_virtual_edges else 1
    return ghn_inputs.spec_from_graph(graph, cutoff)
  raise TypeError(
    f"expected a ghn_jax.graph.Graph or ghn_inputs.GraphSpec, got "
    f"{type(graph).__name__}."
  )


def prepare_inputs(
  config: GHNConfig, graphs: Sequence[GraphLike]
) -> tuple[dict, list[list[ghn_inputs.TensorPlan]]]:
  """Pad a batch of graphs for the GHN (host side, NumPy).

  Returns:
    `(inputs, plans)` as in `ghn_inputs.prepare_batch`.
  """
  specs = [to_spec(config, g) for g in graphs]
  return ghn_inputs.prepare_batch(
    specs, config.decoder_sizes(), config.num_classes
  )


# XLA options of the jitted decoders on CPU (see `_jitted_apply`).
DECODER_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.cache
def _jitted_apply(config: GHNConfig) -> tuple[Callable, Callable]:
  """Return the jitted node embedding and decoding of a config.

  Each compiles once per bucket of input sizes. They are two programs so
  that the decoders, which spend their time in matrix-product library calls,
  can skip LLVM's optimisation passes on CPU. That halves their compile time
  (0.38 s to 0.21 s of CPU for the ResNet-50 graph on a 2-core x86 machine)
  at no measurable run-time cost. The sweeps keep the full optimisation
  because their gathers run about 5 times slower without it.
  """
  ghn = GHN(config)
  embed = jax.jit(functools.partial(ghn.apply, method=GHN.embed_nodes))
  options = DECODER_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  decode = jax.jit(
    functools.partial(ghn.apply, method=GHN.decode),
    compiler_options=options,
  )
  return embed, decode


def apply_jit(ghn: GHN, variables: PyTree, inputs: dict) -> dict:
  """Run the GHN on padded inputs with the cached jitted programs.

  Returns:
    The outputs of `GHN.__call__`.
  """
  embed, decode = _jitted_apply(ghn.config)
  embeddings = embed(variables, inputs)
  outputs = decode(variables, embeddings["x_final"], inputs)
  return {**embeddings, **outputs}


def assemble_params(
  outputs: dict,
  plans: Sequence[ghn_inputs.TensorPlan],
  xp: Any = jnp,
) -> PyTree:
  """Build a nested params dict of one graph from decoder outputs.

  Works on traced JAX arrays (`xp=jax.numpy`, differentiable) and on NumPy
  arrays (`xp=numpy`, fast on the host).
  """
  flat = {
    tuple(plan.path.split("/")): ghn_inputs.assemble_tensor(outputs, plan, xp)
    for plan in plans
  }
  return traverse_util.unflatten_dict(flat)


def _merge_template(params: PyTree, template: PyTree) -> PyTree:
  """Write predicted params into a copy of `template`, checking shapes."""
  flat_template = traverse_util.flatten_dict(template)
  flat = traverse_util.flatten_dict(params)
  for path, value in flat.items():
    if path not in flat_template:
      raise ValueError(
        f"predicted parameter {'/'.join(path)!r} is not in the template; "
        "the graph and the template describe different networks."
      )
    expected = np.shape(flat_template[path])
    if tuple(value.shape) != tuple(expected) and value.size == np.prod(
      expected
    ):
      # Kernels of `nn.DenseGeneral` (e.g. attention projections of shape
      # (in, heads, head_dim)) are nodes with a 2-D shape in the graph.
      flat[path] = value = value.reshape(expected)
    if tuple(value.shape) != tuple(expected):
      raise ValueError(
        f"predicted parameter {'/'.join(path)!r} has shape {value.shape}, "
        f"the template {expected}."
      )
  kept = sorted("/".join(p) for p in flat_template if p not in flat)
  if kept:
    logging.info("%d template parameters not predicted: %s", len(kept), kept)
  return traverse_util.unflatten_dict({**flat_template, **flat})


def predict_params(
  ghn: GHN,
  ghn_params: PyTree,
  graph: GraphLike,
  params_template: PyTree | None = None,
) -> PyTree:
  """Predict all parameters of the network described by `graph`.

  The GHN runs jitted (one compile per padded size bucket); the predicted
  blocks are then tiled into full tensors on the host. For gradients with
  respect to `ghn_params` use `predict_params_batch(..., xp=jax.numpy)`
  inside a traced function.

  Args:
    ghn: the GHN module.
    ghn_params: its variables (`{'params': ...}`).
    graph: a `Graph` (virtual edges are added) or a `GraphSpec`.
    params_template: optional params pytree of the network; predictions
      replace its entries (shapes must match) and other entries are kept.

  Returns:
    Nested dict of predicted parameters (JAX arrays), keyed by the paths of
    `graph.node_params`.

  Raises:
    ValueError: for invalid graphs, or when a prediction does not fit the
      template.
  """
  inputs, plans = prepare_inputs(ghn.config, [graph])
  outputs = jax.device_get(apply_jit(ghn, ghn_params, inputs))
  params = jax.device_put(assemble_params(outputs, plans[0], np))
  if params_template is not None:
    params = _merge_template(params, params_template)
  return params


def predict_params_batch(
  ghn: GHN,
  ghn_params: PyTree,
  inputs: dict,
  plans: Sequence[Sequence[ghn_inputs.TensorPlan]],
) -> list[PyTree]:
  """Predict parameters of a prepared batch, differentiably (pure JAX).

  Call `prepare_inputs` outside the traced function and close over the
  plans (they are static).

  Returns:
    One params dict per graph.
  """
  outputs = ghn.apply(ghn_params, inputs)
  return [assemble_params(outputs, p, jnp) for p in plans]


def node_embeddings(
  ghn: GHN, ghn_params: PyTree, graphs: Sequence[GraphLike]
) -> list[Array]:
  """Final node embeddings (after layer norm) of each graph (for property
  prediction, as in the GHN-2 paper, Sec. 5.3)."""
  specs = [to_spec(ghn.config, g) for g in graphs]
  inputs, _ = prepare_inputs(ghn.config, specs)
  x = apply_jit(ghn, ghn_params, inputs)["x_final"]
  offsets = np.cumsum([0] + [s.num_nodes for s in specs])
  return [x[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


_CONFIG_KEY = "__ghn_config__"


def save_ghn(path: str, config: GHNConfig, ghn_params: PyTree) -> None:
  """Save a GHN's config and variables to an `.npz` file (no pickle)."""
  flat = traverse_util.flatten_dict(jax.device_get(ghn_params), sep="/")
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  arrays[_CONFIG_KEY] = np.array(config.to_json())
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def load_ghn(path: str) -> tuple[GHN, PyTree]:
  """Load a GHN saved by `save_ghn`.

  Returns:
    `(ghn, variables)`.

  Raises:
    ValueError: if the file is not a saved GHN or its arrays do not match
      the config's parameters.
  """
  with np.load(path, allow_pickle=False) as data:
    if _CONFIG_KEY not in data:
      raise ValueError(
        f"{path} is not a ghn_jax GHN file: no {_CONFIG_KEY!r} entry. "
        "Convert original checkpoints with experiments/convert_checkpoint.py."
      )
    config = GHNConfig.from_json(str(data[_CONFIG_KEY]))
    flat = {k: data[k] for k in data.files if k != _CONFIG_KEY}
  ghn = GHN(config)
  variables = traverse_util.unflatten_dict(flat, sep="/")
  check_variables(config, variables)
  return ghn, jax.tree_util.tree_map(jnp.asarray, variables)


def check_variables(config: GHNConfig, variables: PyTree) -> None:
  """Raise ValueError unless `variables` fit a GHN of `config` exactly."""
  _, reference = init_ghn_shapes(config)
  expected = traverse_util.flatten_dict(reference, sep="/")
  got = traverse_util.flatten_dict(variables, sep="/")
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(
      f"GHN variables do not match the config: missing {missing}, "
      f"unexpected {extra}."
    )
  for key, value in got.items():
    if tuple(np.shape(value)) != tuple(expected[key].shape):
      raise ValueError(
        f"GHN variable {key} has shape {np.shape(value)}, expected "
        f"{expected[key].shape}."
      )


def init_ghn_shapes(config: GHNConfig) -> tuple[GHN, PyTree]:
  """Shapes of a GHN's variables (no computation)."""
  ghn = GHN(config)
  init_fn = functools.partial(ghn.init, method=GHN.create_variables)
  return ghn, jax.eval_shape(init_fn, jax.random.key(0))
