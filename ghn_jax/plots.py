"""Plots of evaluation results (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURE_DPI = 120
# Horizontal spread of the strip-plot points around each box (axis units).
STRIP_JITTER = 0.08
SOURCE_COLORS = {"ghn": "tab:blue", "random": "tab:gray", "sgd": "tab:orange"}
SOURCE_LABELS = {"ghn": "GHN prediction", "random": "random init"}
# Space added beyond a reference line that widens the y range, as a fraction
# of the range.
Y_MARGIN = 0.05


def _save(fig: plt.Figure, path: str) -> str:
  """Save `fig` to `path` and close it; return the path."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=FIGURE_DPI)
  plt.close(fig)
  return path


def include_level(ax: plt.Axes, level: float) -> None:
  """Widen the y range of `ax` so that the horizontal line at `level` shows.

  Matplotlib stops autoscaling an axis once a limit is set (the plots set
  the bottom to 0), so a line outside the range would be clipped.
  """
  bottom, top = ax.get_ylim()
  if bottom < level < top:
    return
  low, high = min(bottom, level), max(top, level)
  margin = Y_MARGIN * (high - low)
  ax.set_ylim(
    low - margin if level <= bottom else bottom,
    high + margin if level >= top else top,
  )


def _finish_axes(
  ax: plt.Axes, title: str, chance: float | None, legend_outside: bool = False
) -> None:
  """Draw the chance level, the legend and the title."""
  if chance is not None:
    ax.axhline(
      100 * chance, color="black", linestyle=":", linewidth=1, label="chance"
    )
    include_level(ax, 100 * chance)
  if legend_outside:
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
  else:
    ax.legend(fontsize="x-small", loc="best")
  if title:
    ax.set_title(title, fontsize="medium")


def plot_accuracy_by_split(
  records: Sequence[Mapping[str, Any]],
  path: str,
  title: str = "",
  chance: float | None = None,
) -> str:
  """Box and strip plot of top-1 accuracy per split, GHN next to random.

  Args:
    records: per-network records of `ghn_jax.evaluate.evaluate_network`.
    path: PNG file to write.
    title: figure title.
    chance: accuracy of random guessing, drawn as a dotted line.

  Returns:
    `path`.
  """
  splits = list(dict.fromkeys(r["split"] for r in records))
  sources = [s for s in ("ghn", "random") if any(s in r for r in records)]
  width = 0.8 / len(sources)
  rng = np.random.default_rng(0)
  fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(splits) + 2), 4))
  for j, source in enumerate(sources):
    positions = np.arange(len(splits)) + (j - (len(sources) - 1) / 2) * width
    values = [
      [100 * r[source]["top1"] for r in records if r["split"] == s]
      for s in splits
    ]
    boxes = ax.boxplot(
      values,
      positions=positions,
      widths=width * 0.8,
      patch_artist=True,
      showfliers=False,
    )
    for box in boxes["boxes"]:
      box.set(facecolor=SOURCE_COLORS[source], alpha=0.3)
    for position, group in zip(positions, values, strict=True):
      jitter = rng.uniform(-STRIP_JITTER, STRIP_JITTER, len(group)) * width
      ax.scatter(
        position + jitter,
        group,
        s=14,
        color=SOURCE_COLORS[source],
        zorder=3,
        label=SOURCE_LABELS[source] if position == positions[0] else None,
      )
  ax.set_xticks(np.arange(len(splits)), splits)
  ax.set_xlabel("split")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(bottom=0)
  ax.grid(axis="y", alpha=0.3)
  _finish_axes(ax, title, chance)
  return _save(fig, path)


def plot_accuracy_vs_params(
  records: Sequence[Mapping[str, Any]],
  path: str,
  title: str = "",
  chance: float | None = None,
) -> str:
  """Scatter of top-1 accuracy against parameter count (log x), per split.

  Args:
    records: per-network records.
    path: PNG file to write.
    title: figure title.
    chance: accuracy of random guessing, drawn as a dotted line.

  Returns:
    `path`.
  """
  splits = list(dict.fromkeys(r["split"] for r in records))
  markers = "osD^v<>PX*"
  fig, ax = plt.subplots(figsize=(8, 4))
  for i, split in enumerate(splits):
    group = [r for r in records if r["split"] == split]
    for source in ("ghn", "random"):
      points = [
        (r["num_params"], 100 * r[source]["top1"]) for r in group if source in r
      ]
      if not points:
        continue
      x, y = zip(*points, strict=True)
      ax.scatter(
        x,
        y,
        marker=markers[i % len(markers)],
        color=SOURCE_COLORS[source],
        alpha=0.8 if source == "ghn" else 0.4,
        label=f"{split}, {SOURCE_LABELS[source]}",
      )
  # Networks outside DeepNets-1M splits (e.g. resnet50) are named on the plot.
  for record in records:
    if "ghn" in record and "/" not in record["name"]:
      ax.annotate(
        record["name"],
        (record["num_params"], 100 * record["ghn"]["top1"]),
        fontsize="x-small",
        xytext=(3, 3),
        textcoords="offset points",
      )
  ax.set_xscale("log")
  ax.margins(x=0.1)
  ax.set_xlabel("parameters")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  _finish_axes(ax, title, chance, legend_outside=True)
  return _save(fig, path)


def plot_sgd_curves(
  records: Sequence[Mapping[str, Any]],
  path: str,
  title: str = "",
  chance: float | None = None,
) -> str:
  """Accuracy against SGD steps (log x) per network, with the GHN's level.

  Step 0 (random initialisation) is drawn at x = 0.5 so it fits the log
  axis. Each network's GHN accuracy is a dashed line in the same colour.

  Args:
    records: per-network records; those without 'sgd' are skipped.
    path: PNG file to write.
    title: figure title.
    chance: accuracy of random guessing, drawn as a dotted line.

  Returns:
    `path`.
  """
  trained = [r for r in records if "sgd" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, record in enumerate(trained):
    color = colors[i % len(colors)]
    steps = [max(k, 0.5) for k in record["sgd"]["steps"]]
    ax.plot(
      steps,
      [100 * a for a in record["sgd"]["top1"]],
      marker="o",
      color=color,
      label=f"{record['name']}: SGD",
    )
    if "ghn" in record:
      ax.axhline(
        100 * record["ghn"]["top1"],
        color=color,
        linestyle="--",
        label=f"{record['name']}: GHN",
      )
  ax.set_xscale("log")
  ax.set_xlabel("SGD steps from random init (0 drawn at 0.5)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  _finish_axes(ax, title, chance)
  return _save(fig, path)


def plot_finetune_curves(
  curves: Mapping[str, Mapping[str, Sequence[float]]],
  path: str,
  title: str = "",
  chance: float | None = None,
) -> str:
  """Test accuracy against training steps, one line per initialisation.

  Args:
    curves: {label: {'steps': [...], 'top1': [...]}}, e.g. labels
      'GHN prediction' and 'random init'.
    path: PNG file to write.
    title: figure title.
    chance: accuracy of random guessing, drawn as a dotted line.

  Returns:
    `path`.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, curve in curves.items():
    ax.plot(
      curve["steps"], [100 * a for a in curve["top1"]], marker="o", label=label
    )
  ax.set_xlabel("training steps")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  _finish_axes(ax, title, chance)
  return _save(fig, path)
