"""Static structure of a DeepNets-1M network: channels, sizes and liveness.

`build_plan` derives from a `NetConfig` everything the Flax network needs to
create its modules. It computes the channels and strides of every cell and
which states of a cell have a value; a state is empty when all operations
feeding it are `none` or read empty states. It also finds which modules
reach the logits. Modules
that do not reach the logits (for example the preprocessing of a cell input
that only `none` operations read) are not created: the original creates
them but its GHN removes them from the network before predicting
parameters. `param_specs` lists every parameter of the original network,
with the path and layout of the same parameter in the Flax network and
whether it is live, so parameter counts need no network at all.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from ghn_jax.deepnets1m import genotypes as genotypes_lib
from ghn_jax.deepnets1m.config import NetConfig

# Stem of ViT-style networks: a conv with kernel size = stride (patches);
# CIFAR images use 3x3 patches with padding 1 (32 -> 11x11 tokens).
VIT_PATCH_SIZE_IMAGENET = 16
VIT_PATCH_SIZE_CIFAR = 3
# Heads of the `msa` transformer block.
MSA_NUM_HEADS = 8
# Squeeze-excitation reduces channels by this factor.
CSE_REDUCTION = 2
# Pooling operations and the stem's max pooling are 3x3.
POOL_WINDOW = 3
# Layer that follows each hidden dense layer of the classifier in the
# original (ReLU, Dropout), so classifier layers are numbered 0, 3, 6, ...
_TORCH_CLASSIFIER_STRIDE = 3

# Axes permutations from the original's layouts to the Flax layouts.
PERM_CONV = (2, 3, 1, 0)  # (out, in, h, w) -> (h, w, in, out)
PERM_DENSE = (1, 0)  # (out, in) -> (in, out)
PERM_POS_ENC = (0, 2, 3, 1)  # (1, C, h, w) -> (1, h, w, C)
PERM_VECTOR = (0,)


def parse_op(op: str) -> tuple[str, int]:
  """Split an operation name into its kind and kernel size.

  Args:
    op: a name from `genotypes.OPERATIONS`.

  Returns:
    (kind, kernel size): kinds are none, max_pool, avg_pool, skip_connect,
    sep_conv, dil_conv, conv, conv_double (1xk then kx1), msa and cse; the
    kernel size is 0 for operations without one.

  Raises:
    ValueError: if `op` is not a DeepNets-1M operation.
  """
  if op not in genotypes_lib.OPERATION_INDEX:
    raise ValueError(
      f"Unknown operation {op!r}; expected one of {genotypes_lib.OPERATIONS}."
    )
  if op == "conv_7x1_1x7":
    return "conv_double", 7
  parts = op.rsplit("_", 1)
  if len(parts) == 2 and "x" in parts[1]:
    return parts[0], int(parts[1].split("x")[0])
  return op, 0


@dataclasses.dataclass(frozen=True)
class CellPlan:
  """Static structure of one cell.

  Attributes:
    index: position of the cell in the network.
    reduction: whether this is a reduction cell.
    reduction_prev: whether input 0 has twice the resolution of input 1
      (the previous cell reduced, or the DARTS stem precedes).
    edges: (operation, input state) per edge.
    concat: states concatenated into the output.
    channels_prev_prev: channels of input 0 (before preprocessing).
    channels_prev: channels of input 1 (before preprocessing).
    channels_in: channels of states 0 and 1 after preprocessing.
    channels_out: channels of each sum node (state >= 2).
    strides: stride of each edge's operation.
    input_present: whether each of the two inputs has a value.
    state_present: whether each state has a value.
    preprocess_live: whether each input's preprocessing reaches the logits.
    edge_live: whether each edge's operation is computed and reaches the
      logits.
    output_present: whether the cell output has a value.
    live: whether the cell output reaches the logits.
    resolution: height (= width) of the cell output.
  """

  index: int
  reduction: bool
  reduction_prev: bool
  edges: tuple[genotypes_lib.Edge, ...]
  concat: tuple[int, ...]
  channels_prev_prev: int
  channels_prev: int
  channels_in: int
  channels_out: int
  strides: tuple[int, ...]
  input_present: tuple[bool, bool]
  state_present: tuple[bool, ...]
  preprocess_live: tuple[bool, bool]
  edge_live: tuple[bool, ...]
  output_present: bool
  live: bool
  resolution: int

  @property
  def channels(self) -> int:
    """Channels of the cell output."""
    return len(self.concat) * self.channels_out

  def edge_channels_in(self, edge: int) -> int:
    """Input channels of the operation on edge `edge`."""
    state = self.edges[edge][1]
    if state < genotypes_lib.NUM_CELL_INPUTS:
      return self.channels_in
    return self.channels_out


@dataclasses.dataclass(frozen=True)
class NetPlan:
  """Static structure of a network.

  Attributes:
    config: the configuration.
    stem_channels: channels of the stem output (of `stem0` for stem type 1).
    stem_live: whether stem0 (type 1), respectively stem1, reach the logits;
      (True, True) for the other stems.
    cells: plan of each cell.
    classifier_in: features entering the classifier.
    resolution: height (= width) of the last feature map.
  """

  config: NetConfig
  stem_channels: int
  stem_live: tuple[bool, bool]
  cells: tuple[CellPlan, ...]
  classifier_in: int
  resolution: int


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


def _reduces(num_cells: int, index: int) -> bool:
  return index > 0 and index in (num_cells // 3, 2 * num_cells // 3)


def _stem_resolutions(config: NetConfig) -> tuple[int, int, int]:
  """Return (resolution of input 0 of cell 0, of input 1, stem channels)."""
  size = config.input_size
  kernel = config.stem_kernel_size
  if config.vit:
    if config.imagenet_input:
      patch, padding = VIT_PATCH_SIZE_IMAGENET, 0
    else:
      patch, padding = VIT_PATCH_SIZE_CIFAR, 1
    tokens = _conv_out(size, patch, patch, padding)
    return tokens, tokens, config.channels
  if config.stem_type == 0:
    stride = 4 if config.imagenet_input else 1
    size = _conv_out(size, kernel, stride, kernel // 2)
    if config.stem_pool:
      size = _conv_out(size, POOL_WINDOW, 2, 1)
    multiplier = 3 if (config.preprocess and not config.imagenet_input) else 1
    return size, size, config.channels * multiplier
  stride = 2 if config.imagenet_input else 1
  size = _conv_out(size, kernel, stride, kernel // 2)
  size = _conv_out(size, 3, stride, 1)
  return size, _conv_out(size, 3, 2, 1), config.channels


def _cell_presence(
  edges, concat, input_present
) -> tuple[tuple[bool, ...], bool]:
  present = list(input_present)
  for step in range(len(edges) // 2):
    pair = edges[2 * step : 2 * step + 2]
    present.append(any(op != "none" and present[j] for op, j in pair))
  return tuple(present), any(present[i] for i in concat)


def _cell_liveness(edges, concat, present, live_output):
  """Return (edge live flags, state live flags) of a cell."""
  num_states = len(present)
  state_live = [False] * num_states
  edge_live = [False] * len(edges)
  if live_output:
    for i in concat:
      state_live[i] = present[i]
  for state in range(num_states - 1, genotypes_lib.NUM_CELL_INPUTS - 1, -1):
    if not state_live[state]:
      continue
    step = state - genotypes_lib.NUM_CELL_INPUTS
    for edge in (2 * step, 2 * step + 1):
      op, source = edges[edge]
      if op != "none" and present[source]:
        edge_live[edge] = True
        state_live[source] = True
  return tuple(edge_live), tuple(state_live)


@functools.lru_cache(maxsize=4096)
def build_plan(config: NetConfig) -> NetPlan:
  """Derive the static structure of the network of `config`.

  Follows the channel rules of the original's `Network`: `C_curr` grows by
  `channel_multiplier` at each reduction cell, cells without preprocessing
  take the channels of their input, and the simple stem has 3x channels
  when preprocessing CIFAR-size inputs.

  Raises:
    ValueError: if the network output is empty (all paths from the input
      to the output pass through `none` operations: a disconnected graph),
      or if the two inputs of a cell have different resolutions.
  """
  raw, stem_channels = _forward_cells(config)
  if not raw[-1]["output_present"]:
    raise ValueError(
      f"The network of genotype {config.genotype.to_dict()!r} with "
      f"{config.num_cells} cells has no path from the input to the output "
      "(every path passes through 'none' operations): its graph would be "
      "disconnected. Use a genotype whose cells read their inputs."
    )
  cells, stem_live = _backward_cells(config, raw)

  last = cells[-1]
  if config.global_pooling:
    classifier_in = last.channels
  else:
    classifier_in = last.channels * last.resolution**2
  return NetPlan(
    config=config,
    stem_channels=stem_channels,
    stem_live=stem_live,
    cells=tuple(cells),
    classifier_in=classifier_in,
    resolution=last.resolution,
  )


def _forward_cells(config: NetConfig) -> tuple[list[dict], int]:
  """Compute channels, strides, resolutions and presence, cell by cell.

  Returns:
    (one dict of `CellPlan` fields per cell, without the liveness fields,
    plus the resolutions of its two inputs; channels of the stem output).
  """
  genotype = config.genotype
  num_cells = config.num_cells
  res0, res1, stem_channels = _stem_resolutions(config)
  channels_prev_prev = channels_prev = stem_channels
  channels_curr = config.channels
  # The original also sets `reduction_prev` for ViT networks, but their
  # cells ignore it.
  reduction_prev = config.stem_type == 1 and not config.vit
  # Outputs seen by the next cell: (present, resolution) of inputs 0 and 1.
  inputs = [(True, res0), (True, res1)]
  raw = []
  for index in range(num_cells):
    reduction = _reduces(num_cells, index)
    if reduction:
      channels_curr *= config.channel_multiplier
    edges, concat = genotype.cell(reduction)
    channels_in = channels_curr if config.preprocess else channels_prev
    widen = (
      _reduces(num_cells, index + 1)
      and len(concat) == 1
      and not config.preprocess
    )
    channels_out = channels_curr * (config.channel_multiplier if widen else 1)
    cell_reduces_space = reduction and not config.vit
    strides = tuple(
      2 if (cell_reduces_space and j < genotypes_lib.NUM_CELL_INPUTS) else 1
      for _, j in edges
    )
    input_present = (inputs[0][0], inputs[1][0])
    present, output_present = _cell_presence(edges, concat, input_present)
    in_res0 = inputs[0][1]
    if reduction_prev and not config.vit:
      in_res0 = math.ceil(in_res0 / 2)
    in_res1 = inputs[1][1]
    resolution = math.ceil(in_res1 / 2) if cell_reduces_space else in_res1
    raw.append(
      dict(
        index=index,
        reduction=reduction,
        reduction_prev=reduction_prev and not config.vit,
        edges=edges,
        concat=concat,
        channels_prev_prev=channels_prev_prev,
        channels_prev=channels_prev,
        channels_in=channels_in,
        channels_out=channels_out,
        strides=strides,
        input_present=input_present,
        state_present=present,
        output_present=output_present,
        resolution=resolution,
        input_resolutions=(in_res0, in_res1),
      )
    )
    reduction_prev = reduction
    channels_prev_prev = channels_prev
    channels_prev = len(concat) * channels_curr
    inputs = [inputs[1], (output_present, resolution)]
  return raw, stem_channels


def _backward_cells(
  config: NetConfig, raw: list[dict]
) -> tuple[list[CellPlan], tuple[bool, bool]]:
  """Find the live modules from the last cell backwards.

  Returns:
    (the cell plans, liveness of the two stem outputs).
  """
  num_cells = config.num_cells
  # needed[k]: the output of cell k reaches the logits; k = -2 and -1 are
  # the two stem outputs.
  needed = {num_cells - 1: True}
  cells = [None] * num_cells
  for index in range(num_cells - 1, -1, -1):
    item = dict(raw[index])
    live = needed.get(index, False)
    edge_live, state_live = _cell_liveness(
      item["edges"], item["concat"], item["state_present"], live
    )
    preprocess_live = (state_live[0], state_live[1])
    if preprocess_live[0]:
      needed[index - 2] = True
    if preprocess_live[1]:
      needed[index - 1] = True
    if live and preprocess_live[0] and preprocess_live[1]:
      _check_input_resolutions(item, config)
    item.pop("input_resolutions")
    cells[index] = CellPlan(
      preprocess_live=preprocess_live,
      edge_live=edge_live,
      live=live,
      **item,
    )

  if config.stem_type == 1 and not config.vit:
    stem1_live = needed.get(-1, False)
    stem_live = (needed.get(-2, False) or stem1_live, stem1_live)
  else:
    stem_live = (True, True)
  return cells, stem_live


def _check_input_resolutions(item: dict, config: NetConfig) -> None:
  res0, res1 = item["input_resolutions"]
  if res0 != res1:
    raise ValueError(
      f"Cell {item['index']} of a network with {config.num_cells} cells "
      f"receives inputs of resolution {res0} and {res1}; they must match. "
      "Use an input size that stays even until the last reduction."
    )


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter of the original network and its Flax counterpart.

  Attributes:
    torch_name: name in the original's PyTorch `state_dict`.
    path: path in the Flax params pytree, keys joined by '/'.
    torch_shape: shape in the original's layout (= GHN layout).
    perm: axes permutation from `torch_shape` to the Flax layout, so that
      `flax_value = numpy.transpose(torch_value, perm)`.
    primitive: GHN node type of the parameter (bias parameters of norm
      layers share the node of the scale and carry the norm's type).
    live: whether the parameter reaches the logits; the Flax network only
      creates live parameters.
  """

  torch_name: str
  path: str
  torch_shape: tuple[int, ...]
  perm: tuple[int, ...]
  primitive: str
  live: bool

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape in the Flax layout."""
    return tuple(self.torch_shape[i] for i in self.perm)

  @property
  def size(self) -> int:
    """Number of values."""
    return math.prod(self.torch_shape)


class _SpecWriter:
  """Collects ParamSpecs under a torch prefix and a Flax prefix."""

  def __init__(self):
    self.specs: list[ParamSpec] = []

  def conv(self, torch, path, out, inp, kh, kw, live, primitive="conv"):
    self.specs.append(
      ParamSpec(
        f"{torch}.weight",
        f"{path}/kernel",
        (out, inp, kh, kw),
        PERM_CONV,
        primitive,
        live,
      )
    )

  def norm(self, torch, path, channels, live, primitive="bn"):
    for torch_suffix, flax_name in (("weight", "scale"), ("bias", "bias")):
      self.specs.append(
        ParamSpec(
          f"{torch}.{torch_suffix}",
          f"{path}/{flax_name}",
          (channels,),
          PERM_VECTOR,
          primitive,
          live,
        )
      )

  def batch_norm(self, config, torch, path, channels, live):
    if config.norm is not None:
      self.norm(torch, path, channels, live)

  def dense(self, torch, path, out, inp, live, bias=True):
    self.specs.append(
      ParamSpec(
        f"{torch}.weight",
        f"{path}/kernel",
        (out, inp),
        PERM_DENSE,
        "conv",
        live,
      )
    )
    if bias:
      self.specs.append(
        ParamSpec(
          f"{torch}.bias", f"{path}/bias", (out,), PERM_VECTOR, "bias", live
        )
      )


def _stem_specs(writer: _SpecWriter, plan: NetPlan) -> None:
  config = plan.config
  kernel = config.stem_kernel_size
  channels = config.channels
  if config.vit:
    patch = (
      VIT_PATCH_SIZE_IMAGENET if config.imagenet_input else VIT_PATCH_SIZE_CIFAR
    )
    writer.conv("stem0", "stem0/conv", channels, 3, patch, patch, True)
    tokens = _stem_resolutions(config)[0]
    writer.specs.append(
      ParamSpec(
        "pos_enc.weight",
        "pos_enc/embedding",
        (1, channels, tokens, tokens),
        PERM_POS_ENC,
        "pos_enc",
        True,
      )
    )
  elif config.stem_type == 0:
    stem = plan.stem_channels
    writer.conv("stem.0", "stem/conv", stem, 3, kernel, kernel, True)
    writer.batch_norm(config, "stem.1", "stem/bn", stem, True)
  else:
    live0, live1 = plan.stem_live
    half = channels // 2
    writer.conv("stem0.0", "stem0/conv1", half, 3, kernel, kernel, live0)
    writer.batch_norm(config, "stem0.1", "stem0/bn1", half, live0)
    writer.conv("stem0.3", "stem0/conv2", channels, half, 3, 3, live0)
    writer.batch_norm(config, "stem0.4", "stem0/bn2", channels, live0)
    writer.conv("stem1.1", "stem1/conv", channels, channels, 3, 3, live1)
    writer.batch_norm(config, "stem1.2", "stem1/bn", channels, live1)


def _factorized_reduce_specs(writer, config, torch, path, inp, out, live):
  writer.conv(f"{torch}.conv_1", f"{path}/conv1", out // 2, inp, 1, 1, live)
  writer.conv(f"{torch}.conv_2", f"{path}/conv2", out // 2, inp, 1, 1, live)
  writer.batch_norm(config, f"{torch}.bn", f"{path}/bn", out, live)


def _edge_specs(writer, config, cell: CellPlan, edge: int, torch, path):
  op, _ = cell.edges[edge]
  kind, kernel = parse_op(op)
  live = cell.edge_live[edge]
  inp = cell.edge_channels_in(edge)
  out = cell.channels_out
  bn = functools.partial(writer.batch_norm, config)
  if kind == "conv":
    writer.conv(f"{torch}.op.1", f"{path}/conv", out, inp, kernel, kernel, live)
    bn(f"{torch}.op.2", f"{path}/bn", out, live)
  elif kind == "conv_double":
    writer.conv(f"{torch}.op.1", f"{path}/conv_1xk", inp, inp, 1, kernel, live)
    writer.conv(f"{torch}.op.2", f"{path}/conv_kx1", out, inp, kernel, 1, live)
    bn(f"{torch}.op.3", f"{path}/bn", out, live)
  elif kind == "sep_conv":
    depthwise = functools.partial(writer.conv, primitive="sep_conv")
    depthwise(
      f"{torch}.op.1", f"{path}/depthwise1", inp, 1, kernel, kernel, live
    )
    writer.conv(f"{torch}.op.2", f"{path}/pointwise1", inp, inp, 1, 1, live)
    bn(f"{torch}.op.3", f"{path}/bn1", inp, live)
    depthwise(
      f"{torch}.op.5", f"{path}/depthwise2", inp, 1, kernel, kernel, live
    )
    writer.conv(f"{torch}.op.6", f"{path}/pointwise2", out, inp, 1, 1, live)
    bn(f"{torch}.op.7", f"{path}/bn2", out, live)
  elif kind == "dil_conv":
    depthwise = functools.partial(writer.conv, primitive="dil_conv")
    depthwise(
      f"{torch}.op.1", f"{path}/depthwise", inp, 1, kernel, kernel, live
    )
    writer.conv(f"{torch}.op.2", f"{path}/pointwise", out, inp, 1, 1, live)
    bn(f"{torch}.op.3", f"{path}/bn", out, live)
  elif kind == "skip_connect" and cell.strides[edge] > 1:
    _factorized_reduce_specs(writer, config, torch, path, inp, out, live)
  elif kind == "msa":
    inner = (inp // MSA_NUM_HEADS) * MSA_NUM_HEADS
    writer.dense(
      f"{torch}.to_qkv", f"{path}/to_qkv", 3 * inner, inp, live, False
    )
    writer.dense(f"{torch}.to_out.0", f"{path}/to_out", out, inner, live)
    writer.norm(f"{torch}.ln1", f"{path}/ln1", inp, live, "ln")
    writer.norm(f"{torch}.ln2", f"{path}/ln2", inp, live, "ln")
    writer.dense(f"{torch}.ff.net.0", f"{path}/ff1", out, inp, live)
    writer.dense(f"{torch}.ff.net.3", f"{path}/ff2", inp, out, live)
  elif kind == "cse":
    reduced = inp // CSE_REDUCTION
    writer.dense(f"{torch}.fc1", f"{path}/fc1", reduced, inp, live)
    writer.dense(f"{torch}.fc2", f"{path}/fc2", inp, reduced, live)


def _cell_specs(writer: _SpecWriter, config: NetConfig, cell: CellPlan):
  torch = f"cells.{cell.index}"
  path = f"cells_{cell.index}"
  if config.preprocess:
    live0, live1 = cell.preprocess_live
    if cell.reduction_prev:
      _factorized_reduce_specs(
        writer,
        config,
        f"{torch}.preprocess0",
        f"{path}/preprocess0",
        cell.channels_prev_prev,
        cell.channels_out,
        live0,
      )
    else:
      _relu_conv_bn_specs(
        writer, config, torch, path, 0, cell.channels_prev_prev, cell, live0
      )
    _relu_conv_bn_specs(
      writer, config, torch, path, 1, cell.channels_prev, cell, live1
    )
  for edge in range(len(cell.edges)):
    _edge_specs(
      writer, config, cell, edge, f"{torch}._ops.{edge}", f"{path}/ops_{edge}"
    )


def _relu_conv_bn_specs(writer, config, torch, path, which, inp, cell, live):
  torch = f"{torch}.preprocess{which}"
  path = f"{path}/preprocess{which}"
  writer.conv(
    f"{torch}.op.1", f"{path}/conv", cell.channels_out, inp, 1, 1, live
  )
  writer.batch_norm(
    config, f"{torch}.op.2", f"{path}/bn", cell.channels_out, live
  )


def _classifier_specs(writer: _SpecWriter, plan: NetPlan) -> None:
  config = plan.config
  num_layers = max(config.num_fc_layers, 1)
  features = plan.classifier_in
  for layer in range(num_layers):
    last = layer == num_layers - 1
    out = config.num_classes if last else config.fc_dim
    torch = f"classifier.{_TORCH_CLASSIFIER_STRIDE * layer}"
    writer.dense(torch, f"classifier/fc{layer}", out, features, True)
    features = out


@functools.lru_cache(maxsize=4096)
def param_specs(config: NetConfig) -> tuple[ParamSpec, ...]:
  """List every parameter of the original network of `config`.

  Includes the parameters of modules that do not reach the logits
  (`live=False`), which the original creates and the Flax network does not.

  Raises:
    ValueError: as `build_plan`.
  """
  plan = build_plan(config)
  writer = _SpecWriter()
  _stem_specs(writer, plan)
  for cell in plan.cells:
    _cell_specs(writer, config, cell)
  _classifier_specs(writer, plan)
  return tuple(writer.specs)


def count_params(config: NetConfig, include_dead: bool = False) -> int:
  """Count the parameters of the network of `config`, without building it.

  Args:
    config: the network.
    include_dead: also count parameters of modules that do not reach the
      logits, as the original's generator does (its size caps and the
      training-time width rules use that count).

  Returns:
    The number of parameter values.
  """
  return sum(s.size for s in param_specs(config) if include_dead or s.live)


def torch_name_mapping(config: NetConfig) -> dict[str, ParamSpec]:
  """Map each original parameter name to its spec (path, layout, liveness)."""
  return {spec.torch_name: spec for spec in param_specs(config)}
