"""Cell genotypes of DeepNets-1M and the predefined ones (DARTS, ViT, ...).

A genotype describes the two cell types of a network (normal and reduction)
in the DARTS format: each intermediate ("sum") node `i` of a cell adds the
outputs of two operations, each applied to an earlier state. States 0 and 1
are the two cell inputs (outputs of the two previous cells), state `2 + i` is
the output of sum node `i`, and the cell output concatenates the states
listed in `*_concat` along channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# The 15 operations of DeepNets-1M in the original's index order (the DARTS
# operations extended with dense convolutions, attention and squeeze-
# excitation). Sampling draws an index into this tuple.
OPERATIONS = (
  "none",
  "max_pool_3x3",
  "avg_pool_3x3",
  "skip_connect",
  "sep_conv_3x3",
  "sep_conv_5x5",
  "dil_conv_3x3",
  "dil_conv_5x5",
  "conv_1x1",
  "conv_7x1_1x7",
  "conv_3x3",
  "conv_5x5",
  "conv_7x7",
  "msa",
  "cse",
)
OPERATION_INDEX = {name: i for i, name in enumerate(OPERATIONS)}

# Number of cell inputs (the outputs of the two previous cells).
NUM_CELL_INPUTS = 2

Edge = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Genotype:
  """Normal and reduction cell of a network.

  Attributes:
    normal: (operation, input state) per edge of a normal cell, two edges per
      sum node in order.
    normal_concat: states concatenated into the normal cell's output.
    reduce: edges of a reduction cell, like `normal`.
    reduce_concat: states concatenated into the reduction cell's output.
  """

  normal: tuple[Edge, ...]
  normal_concat: tuple[int, ...]
  reduce: tuple[Edge, ...]
  reduce_concat: tuple[int, ...]

  def __post_init__(self):
    for field in ("normal", "reduce"):
      edges = tuple((str(op), int(j)) for op, j in getattr(self, field))
      object.__setattr__(self, field, edges)
    for field in ("normal_concat", "reduce_concat"):
      concat = tuple(int(i) for i in getattr(self, field))
      object.__setattr__(self, field, concat)
    _validate_cell("normal", self.normal, self.normal_concat)
    _validate_cell("reduce", self.reduce, self.reduce_concat)

  @property
  def steps(self) -> int:
    """Number of sum nodes per cell (the same in both cell types)."""
    return len(self.normal) // 2

  def cell(self, reduction: bool) -> tuple[tuple[Edge, ...], tuple[int, ...]]:
    """Return (edges, concat) of the reduction or the normal cell."""
    if reduction:
      return self.reduce, self.reduce_concat
    return self.normal, self.normal_concat

  def all_ops(self) -> tuple[str, ...]:
    """Operation names of all edges, normal cell first."""
    return tuple(op for op, _ in self.normal + self.reduce)

  def has_op(self, op: str) -> bool:
    """Check whether any edge of either cell type uses operation `op`."""
    return op in self.all_ops()

  def to_dict(self) -> dict[str, list]:
    """Convert to the JSON-able dict format of the original's metadata."""
    return {
      "normal": [[op, j] for op, j in self.normal],
      "normal_concat": list(self.normal_concat),
      "reduce": [[op, j] for op, j in self.reduce],
      "reduce_concat": list(self.reduce_concat),
    }

  @classmethod
  def from_dict(cls, genotype: Mapping[str, Any]) -> Genotype:
    """Build a genotype from the dict format (`to_dict`, original metadata).

    Raises:
      ValueError: if a key is missing or the cells are invalid.
    """
    if isinstance(genotype, Genotype):
      return genotype
    keys = ("normal", "normal_concat", "reduce", "reduce_concat")
    missing = [k for k in keys if k not in genotype]
    if missing:
      raise ValueError(
        f"Genotype dict {dict(genotype)!r} is missing keys {missing}; "
        f"expected the keys {keys}."
      )
    return cls(**{k: genotype[k] for k in keys})


def _validate_cell(
  name: str, edges: Sequence[Edge], concat: Sequence[int]
) -> None:
  """Check the operation names and state indices of one cell type."""
  if not edges or len(edges) % 2:
    raise ValueError(
      f"The {name} cell has {len(edges)} edges; expected a positive even "
      "number (two edges per sum node)."
    )
  steps = len(edges) // 2
  for position, (op, state) in enumerate(edges):
    if op not in OPERATION_INDEX:
      raise ValueError(
        f"Unknown operation {op!r} in the {name} cell; expected one of "
        f"{OPERATIONS}."
      )
    num_available = NUM_CELL_INPUTS + position // 2
    if not 0 <= state < num_available:
      raise ValueError(
        f"Edge {position} ({op!r}) of the {name} cell reads state {state}; "
        f"sum node {position // 2} can only read states 0..{num_available - 1}."
      )
  num_states = NUM_CELL_INPUTS + steps
  if not concat:
    raise ValueError(f"The {name} cell concatenates no state.")
  for state in concat:
    if not NUM_CELL_INPUTS <= state < num_states:
      raise ValueError(
        f"The {name} cell concatenates state {state}; expected a sum node "
        f"output in {NUM_CELL_INPUTS}..{num_states - 1}."
      )


# Best cell found by DARTS (second order) on CIFAR-10 (Liu et al., 2019).
DARTS = Genotype(
  normal=(
    ("sep_conv_3x3", 0),
    ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 0),
    ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 1),
    ("skip_connect", 0),
    ("skip_connect", 0),
    ("dil_conv_3x3", 2),
  ),
  normal_concat=(2, 3, 4, 5),
  reduce=(
    ("max_pool_3x3", 0),
    ("max_pool_3x3", 1),
    ("skip_connect", 2),
    ("max_pool_3x3", 1),
    ("max_pool_3x3", 0),
    ("skip_connect", 2),
    ("skip_connect", 2),
    ("max_pool_3x3", 1),
  ),
  reduce_concat=(2, 3, 4, 5),
)

# Cell found by P-DARTS (Chen et al., 2019), shipped with the original.
PDARTS = Genotype(
  normal=(
    ("skip_connect", 0),
    ("dil_conv_3x3", 1),
    ("skip_connect", 0),
    ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 3),
    ("sep_conv_3x3", 0),
    ("dil_conv_5x5", 4),
  ),
  normal_concat=(2, 3, 4, 5),
  reduce=(
    ("avg_pool_3x3", 0),
    ("sep_conv_5x5", 1),
    ("sep_conv_3x3", 0),
    ("dil_conv_5x5", 2),
    ("max_pool_3x3", 0),
    ("dil_conv_3x3", 1),
    ("dil_conv_3x3", 1),
    ("dil_conv_5x5", 3),
  ),
  reduce_concat=(2, 3, 4, 5),
)

# A ViT-style cell: one transformer block per normal cell; reduction cells
# only average-pool (without striding, because ViT-style networks keep their
# token grid).
VIT = Genotype(
  normal=(("none", 0), ("msa", 1)),
  normal_concat=(2,),
  reduce=(("none", 0), ("avg_pool_3x3", 1)),
  reduce_concat=(2,),
)

PREDEFINED_GENOTYPES = {"DARTS": DARTS, "PDARTS": PDARTS, "ViT": VIT}


def get_genotype(name: str) -> Genotype:
  """Return a predefined genotype by name (DARTS, PDARTS or ViT).

  Raises:
    ValueError: if `name` is not a predefined genotype.
  """
  if name not in PREDEFINED_GENOTYPES:
    raise ValueError(
      f"Unknown genotype {name!r}; expected one of "
      f"{sorted(PREDEFINED_GENOTYPES)}."
    )
  return PREDEFINED_GENOTYPES[name]
