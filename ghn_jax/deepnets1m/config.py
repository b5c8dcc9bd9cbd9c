"""Configuration of one DeepNets-1M network (`NetConfig`).

The fields follow the keyword arguments of the original's
`ppuda.deepnets1m.net.Network` (its `net_args`), with whole-word names;
`config_from_net_args` and `NetConfig.to_net_args` convert between the two.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any

from ghn_jax.deepnets1m import genotypes as genotypes_lib

# Norm settings of the original that all mean batch norm. DeepNets-1M
# networks use 'bnorm' (no running statistics); the original Network's
# default is 'bn-track'. This implementation always normalises with batch
# statistics, which is how a GHN trains and evaluates its networks.
BATCH_NORM_NAMES = ("bn", "bnorm", "bn-track")
NO_NORM_NAMES = (None, "", "none")
STEM_TYPES = (0, 1)

# Keyword arguments of the original Network and the NetConfig field of each.
_NET_ARGS_TO_FIELDS = {
  "genotype": "genotype",
  "C": "channels",
  "num_classes": "num_classes",
  "n_cells": "num_cells",
  "ks": "stem_kernel_size",
  "is_imagenet_input": "imagenet_input",
  "stem_pool": "stem_pool",
  "stem_type": "stem_type",
  "is_vit": "vit",
  "norm": "norm",
  "preproc": "preprocess",
  "C_mult": "channel_multiplier",
  "fc_layers": "num_fc_layers",
  "fc_dim": "fc_dim",
  "glob_avg": "global_pooling",
}
# Attention heads of the msa operation (the original's default); the
# operation needs at least one channel per head.
MSA_NUM_HEADS = 8
# Keyword arguments that are accepted but only with these values.
_UNSUPPORTED_NET_ARGS = {"auxiliary": False, "light": None}


@dataclasses.dataclass(frozen=True)
class NetConfig:
  """A network of the DeepNets-1M design space.

  Defaults are those of the original's `Network`, except `imagenet_input`
  (False here: the DeepNets-1M training networks take 32x32 CIFAR images)
  and `norm` (batch norm always uses batch statistics here).

  Attributes:
    genotype: normal and reduction cells.
    channels: channels of the first cell (`C`).
    num_classes: outputs of the classifier.
    num_cells: number of cells; reduction cells are at `num_cells // 3` and
      `2 * num_cells // 3` (when positive).
    stem_kernel_size: kernel size of the first stem convolution (`ks`).
    imagenet_input: 224x224 inputs (True) or 32x32 inputs (False).
    stem_pool: 3x3 max pooling (stride 2) after the simple stem.
    stem_type: 0 (simple stem) or 1 (two-stage DARTS/ImageNet stem).
    vit: ViT-style network (patch stem, positional encoding, no spatial
      reduction); None means True when the genotype contains `msa`.
    norm: 'bn' for batch norm, None for no normalisation.
    preprocess: 1x1 conv (or factorised reduction) on both cell inputs.
    channel_multiplier: channel factor at each reduction cell (`C_mult`).
    num_fc_layers: dense layers of the classifier (0 and 1 both mean one).
    fc_dim: width of the hidden dense layers.
    global_pooling: global average pooling before the classifier (True) or
      flattening of the last feature map (False).
  """

  genotype: genotypes_lib.Genotype
  channels: int = 16
  num_classes: int = 10
  num_cells: int = 8
  stem_kernel_size: int = 3
  imagenet_input: bool = False
  stem_pool: bool = False
  stem_type: int = 0
  vit: bool | None = None
  norm: str | None = "bn"
  preprocess: bool = True
  channel_multiplier: int = 2
  num_fc_layers: int = 0
  fc_dim: int = 0
  global_pooling: bool = True

  def __post_init__(self):
    if not isinstance(self.genotype, genotypes_lib.Genotype):
      object.__setattr__(
        self, "genotype", genotypes_lib.Genotype.from_dict(self.genotype)
      )
    if self.vit is None:
      object.__setattr__(self, "vit", self.genotype.has_op("msa"))
    if self.norm in BATCH_NORM_NAMES:
      object.__setattr__(self, "norm", "bn")
    elif self.norm in NO_NORM_NAMES:
      object.__setattr__(self, "norm", None)
    else:
      raise ValueError(
        f"Unknown norm {self.norm!r}; expected one of {BATCH_NORM_NAMES} "
        f"for batch norm or one of {NO_NORM_NAMES} for none."
      )
    for field in ("channels", "num_classes", "num_cells", "stem_kernel_size"):
      value = getattr(self, field)
      if int(value) != value or value < 1:
        raise ValueError(f"{field}={value!r} must be a positive integer.")
    if self.stem_type not in STEM_TYPES:
      raise ValueError(
        f"Unknown stem_type {self.stem_type!r}; expected 0 (simple stem) "
        "or 1 (DARTS/ImageNet-style stem)."
      )
    if self.channel_multiplier < 1:
      raise ValueError(
        f"channel_multiplier={self.channel_multiplier!r} must be >= 1."
      )
    concat_sizes = (
      len(self.genotype.normal_concat),
      len(self.genotype.reduce_concat),
    )
    if not self.preprocess and (
      max(concat_sizes) > 1 or self.channel_multiplier > 1
    ):
      raise ValueError(
        "preprocess=False requires cells that concatenate one state and "
        f"channel_multiplier=1 (got concatenation sizes {concat_sizes} and "
        f"channel_multiplier={self.channel_multiplier}); set preprocess=True."
      )
    if self.genotype.has_op("msa") and self.channels < MSA_NUM_HEADS:
      raise ValueError(
        f"channels={self.channels} is too few for the msa operation, which "
        f"has {MSA_NUM_HEADS} attention heads; use at least "
        f"{MSA_NUM_HEADS} channels or a genotype without msa."
      )
    if self.num_fc_layers > 1 and self.fc_dim < 1:
      raise ValueError(
        f"num_fc_layers={self.num_fc_layers} needs a positive fc_dim, got "
        f"{self.fc_dim!r}."
      )

  @property
  def steps(self) -> int:
    """Number of sum nodes per cell."""
    return self.genotype.steps

  @property
  def input_size(self) -> int:
    """Height and width of the input images."""
    return IMAGENET_INPUT_SIZE if self.imagenet_input else CIFAR_INPUT_SIZE

  def replace(self, **changes: Any) -> NetConfig:
    """Return a copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  def to_net_args(self) -> dict[str, Any]:
    """Convert to the original's `Network` keyword arguments (JSON-able)."""
    net_args = {}
    for key, field in _NET_ARGS_TO_FIELDS.items():
      value = getattr(self, field)
      if field == "genotype":
        value = value.to_dict()
      elif field == "norm":
        value = "bnorm" if value else None
      net_args[key] = value
    return net_args


IMAGENET_INPUT_SIZE = 224
CIFAR_INPUT_SIZE = 32


def config_from_net_args(
  net_args: Mapping[str, Any] | str, **overrides: Any
) -> NetConfig:
  """Build a `NetConfig` from the original's `Network` keyword arguments.

  Args:
    net_args: a dict (or its Python-literal string) with the keys of the
      original (`C`, `n_cells`, `genotype` as a dict or a predefined name,
      `ks`, `C_mult`, `fc_layers`, ...). Missing keys take NetConfig
      defaults.
    **overrides: NetConfig fields that replace values from `net_args`, e.g.
      `num_classes=100` or `imagenet_input=True`.

  Returns:
    The configuration.

  Raises:
    ValueError: on an unknown key, an unsupported option (auxiliary heads)
      or an invalid value.
  """
  if isinstance(net_args, str):
    net_args = ast.literal_eval(net_args)
  fields = {}
  for key, value in net_args.items():
    if key in _UNSUPPORTED_NET_ARGS:
      if value not in (_UNSUPPORTED_NET_ARGS[key], None, False):
        raise ValueError(
          f"Network option {key}={value!r} is not supported; remove it."
        )
      continue
    if key not in _NET_ARGS_TO_FIELDS:
      raise ValueError(
        f"Unknown network argument {key!r}; expected one of "
        f"{sorted(_NET_ARGS_TO_FIELDS)}."
      )
    fields[_NET_ARGS_TO_FIELDS[key]] = value
  fields.update(overrides)
  if "genotype" not in fields:
    raise ValueError(f"net_args {dict(net_args)!r} has no 'genotype'.")
  genotype = fields["genotype"]
  if isinstance(genotype, str):
    fields["genotype"] = genotypes_lib.get_genotype(genotype)
  elif not isinstance(genotype, genotypes_lib.Genotype):
    fields["genotype"] = genotypes_lib.Genotype.from_dict(genotype)
  for field in ("channels", "num_cells", "stem_kernel_size", "fc_dim"):
    if field in fields:
      fields[field] = int(fields[field])
  return NetConfig(**fields)
