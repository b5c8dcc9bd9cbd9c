"""Training metrics: CSV log, running averages and the training-curve plot."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

METRICS_FILE = "metrics.csv"
CURVES_FILE = "training_curves.png"
FIELDS = (
  "step",
  "loss",
  "top1",
  "grad_norm",
  "learning_rate",
  "steps_per_sec",
  "archs_per_sec",
  "compile_count",
  "skipped_steps",
)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of stacked logits (M, B, C) against labels (B,)."""
  predictions = np.argmax(logits, axis=-1)
  return float(np.mean(predictions == np.asarray(labels)[None]))


class RunningMean:
  """Mean of the values added since the last reset."""

  def __init__(self):
    self.total = 0.0
    self.count = 0

  def add(self, value: float) -> None:
    self.total += float(value)
    self.count += 1

  def value(self) -> float:
    return self.total / self.count if self.count else float("nan")

  def reset(self) -> None:
    self.total, self.count = 0.0, 0


class CsvWriter:
  """Append rows of `FIELDS` to `metrics.csv` in the run directory.

  A resumed run keeps the rows up to its checkpoint step, with their
  original text, and appends after them.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    rows = []
    if os.path.exists(self.path):
      with open(self.path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if float(r["step"]) <= start_step]
    # Write a temporary file and rename it, so that an interrupted rewrite
    # leaves the previous file intact.
    temp_path = self.path + ".tmp"
    with open(temp_path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=FIELDS)
      writer.writeheader()
      for row in rows:
        writer.writerow({k: row.get(k) or "" for k in FIELDS})
    os.replace(temp_path, self.path)

  def write(self, row: dict[str, float]) -> None:
    with open(self.path, "a", newline="") as f:
      csv.DictWriter(f, fieldnames=FIELDS).writerow(
        {k: row.get(k, "") for k in FIELDS}
      )


def read_metrics(path: str) -> list[dict[str, float]]:
  """Read a metrics CSV into a list of rows of floats."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def make_curves_figure(
  rows: Sequence[dict[str, float]],
  title: str = "",
  num_classes: int | None = None,
):
  """Draw loss and top-1 accuracy against step; return the figure.

  Args:
    rows: rows of `metrics.csv` (`read_metrics`).
    title: figure title.
    num_classes: classes of the dataset; if given, the top-1 panel draws
      the chance level 1 / num_classes.

  Returns:
    The matplotlib figure, with the loss and top-1 axes.
  """
  from matplotlib import pyplot as plt

  from ghn_jax import plots

  steps = [r["step"] for r in rows]
  figure, (loss_axis, top1_axis) = plt.subplots(1, 2, figsize=(10, 4))
  loss_axis.plot(steps, [r["loss"] for r in rows])
  loss_axis.set_xlabel("step")
  loss_axis.set_ylabel("cross-entropy of predicted networks")
  top1_axis.plot(steps, [100 * r["top1"] for r in rows], label="training")
  top1_axis.set_xlabel("step")
  top1_axis.set_ylabel("top-1 accuracy on training batches (%)")
  if num_classes:
    chance = 100 / num_classes
    top1_axis.axhline(
      chance, color="black", linestyle=":", linewidth=1, label="chance"
    )
    plots.include_level(top1_axis, chance)
    top1_axis.legend(fontsize="x-small", loc="best")
  if title:
    figure.suptitle(title, fontsize="medium")
  figure.tight_layout()
  return figure


def plot_curves(
  workdir: str,
  rows: Sequence[dict[str, float]],
  dataset: str = "",
  num_classes: int | None = None,
) -> str:
  """Plot loss and top-1 accuracy against step into `training_curves.png`.

  Args:
    workdir: the run directory; its name goes into the title.
    rows: rows of `metrics.csv` (`read_metrics`).
    dataset: the dataset name, for the title.
    num_classes: classes of the dataset, to draw the chance level.

  Returns:
    The path of the PNG file.
  """
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  run_name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  title = f"Meta-training on {dataset}: {run_name}" if dataset else run_name
  figure = make_curves_figure(rows, title, num_classes)
  path = os.path.join(workdir, CURVES_FILE)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path
