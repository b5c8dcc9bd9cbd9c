"""Results of an evaluation as a JSON file and a markdown table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
PLOT_BY_SPLIT = "accuracy_by_split.png"
PLOT_VS_PARAMS = "accuracy_vs_params.png"
PLOT_SGD = "sgd_curves.png"


def write_json(results: Mapping[str, Any], path: str) -> None:
  """Write `results` as indented JSON; NaN becomes null."""

  def clean(value):
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, Mapping):
      return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
      return [clean(v) for v in value]
    return value

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(clean(results), f, indent=1)
    f.write("\n")


def count_noun(count: int, noun: str) -> str:
  """Format a count with a noun in singular or plural, e.g. '1 network'."""
  return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _percent(summary: Mapping[str, Any] | None) -> str:
  """Format a summary of accuracies as 'mean +- std' in percent.

  Only the mean is shown for one network, which has no standard deviation.
  """
  if not summary or not summary.get("n") or summary["mean"] is None:
    return "-"
  if not math.isfinite(summary["mean"]):
    return "-"
  mean = f"{100 * summary['mean']:.1f}"
  if summary["n"] == 1:
    return mean
  return f"{mean} +- {100 * summary['std']:.1f}"


def _value(value: Any, scale: float = 1.0, digits: int = 1) -> str:
  """Format a number, or '-' when missing or not finite."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return f"{scale * value:.{digits}f}"


def _params(count: int) -> str:
  """Format a parameter count as e.g. '1.25M' or '84.0K'."""
  if count >= 1_000_000:
    return f"{count / 1e6:.2f}M"
  return f"{count / 1e3:.1f}K"


def _sgd_columns(records: Sequence[Mapping[str, Any]]) -> list[int]:
  """Step counts of the SGD curves (without step 0)."""
  for record in records:
    if "sgd" in record:
      return list(record["sgd"]["steps"][1:])
  return []


def format_split_table(results: Mapping[str, Any]) -> str:
  """Format the per-split summary as a markdown table."""
  calibrated = results["meta"].get("bn_calibrate", 0) > 0
  header = ["split", "nets", "params (mean)", "GHN top-1 %", "random top-1 %"]
  if calibrated:
    header += ["GHN top-1 % (calibrated BN)", "random top-1 % (calibrated BN)"]
  header.append("prediction s")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for split, summary in results["summary"]["splits"].items():
    row = [
      split,
      str(summary["num_params"]["n"]),
      _params(int(summary["num_params"]["mean"])),
      _percent(summary.get("ghn_top1")),
      _percent(summary.get("random_top1")),
    ]
    if calibrated:
      row += [
        _percent(summary.get("ghn_top1_calibrated")),
        _percent(summary.get("random_top1_calibrated")),
      ]
    row.append(_value(summary.get("predict_seconds", {}).get("mean"), 1, 3))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def format_network_table(results: Mapping[str, Any]) -> str:
  """Format one row per network as a markdown table."""
  records = results["networks"]
  sgd_steps = _sgd_columns(records)
  calibrated = results["meta"].get("bn_calibrate", 0) > 0
  header = ["network", "params", "nodes", "GHN %", "random %"]
  if calibrated:
    header += ["GHN % (calibrated BN)", "random % (calibrated BN)"]
  header += [f"SGD {k} %" for k in sgd_steps]
  if sgd_steps:
    header.append("GHN = SGD steps")
  header.append("prediction s")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for record in records:
    row = [
      record["name"],
      _params(record["num_params"]),
      str(record.get("num_nodes") or "-"),
      _value(record.get("ghn", {}).get("top1"), 100),
      _value(record["random"]["top1"], 100),
    ]
    if calibrated:
      row += [
        _value(record.get("ghn", {}).get("top1_calibrated"), 100),
        _value(record["random"].get("top1_calibrated"), 100),
      ]
    sgd = record.get("sgd")
    if sgd_steps:
      curve = sgd["top1"][1:] if sgd else [None] * len(sgd_steps)
      row += [_value(v, 100) for v in curve]
      row.append(_equivalent(sgd) if sgd else "-")
    row.append(_value(record.get("predict_seconds"), 1, 3))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _equivalent(sgd: Mapping[str, Any]) -> str:
  """Format the SGD steps a GHN prediction is worth, e.g. '< 1' or '37'."""
  steps = sgd.get("ghn_equivalent_steps")
  if steps is None:
    return "-"
  relation = sgd["ghn_equivalent_relation"]
  prefix = "" if relation == "=" else relation + " "
  return f"{prefix}{steps:,.0f}"


def format_markdown(results: Mapping[str, Any]) -> str:
  """Format the whole report: settings, per-split and per-network tables."""
  meta = results["meta"]
  lines = [
    "# GHN evaluation",
    "",
    f"- date: {meta['date']}; machine: {meta['machine']}",
    f"- checkpoint: `{meta['checkpoint']}`",
    f"- dataset: {meta['dataset']} ({meta['test_images']} test images, "
    f"{meta['image_size']}x{meta['image_size']}, "
    f"{meta['num_classes']} classes)"
    + (
      f": {meta['dataset_description']}"
      if meta.get("dataset_description")
      else ""
    ),
    f"- batch norm: statistics of each test batch of "
    f"{meta['test_batch_size']}"
    + (
      f"; calibrated: running statistics from {meta['bn_calibrate']} "
      "training batches"
      if meta.get("bn_calibrate")
      else ""
    ),
    "",
    "## Per split (mean +- std over networks, only the mean for one)",
    "",
    format_split_table(results),
    "",
  ]
  sgd = results["summary"]["sgd"]
  if sgd.get("num_nets"):
    lines += [
      "## SGD from random initialisation",
      "",
      f"{count_noun(sgd['num_nets'], 'network')}; mean top-1 % after "
      + ", ".join(
        f"{k} steps: {100 * a:.1f}"
        for k, a in zip(sgd["steps"], sgd["mean_top1"], strict=True)
      )
      + ".",
    ]
    if "ghn_equivalent_steps" in sgd:
      lines += [
        "",
        f"The GHN's mean top-1 on the same networks "
        f"({100 * sgd['ghn_mean_top1']:.1f} %) equals "
        f"{_equivalent(sgd)} SGD step(s) (log-interpolated; the GHN-2 paper "
        "reports about 2,500 on CIFAR-10).",
      ]
    lines.append("")
  lines += ["## Per network", "", format_network_table(results), ""]
  return "\n".join(lines)


def write_markdown(results: Mapping[str, Any], path: str) -> None:
  """Write `format_markdown(results)` to `path`."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(format_markdown(results))


def write_report(results: Mapping[str, Any], out_dir: str) -> list[str]:
  """Write results.json, results.md and the PNG plots to `out_dir`.

  Returns:
    The paths written.
  """
  from ghn_jax import plots  # noqa: PLC0415 (matplotlib is slow to import)

  paths = [
    os.path.join(out_dir, RESULTS_JSON),
    os.path.join(out_dir, RESULTS_MARKDOWN),
  ]
  write_json(results, paths[0])
  write_markdown(results, paths[1])
  meta = results["meta"]
  title = f"{meta['dataset']}, GHN {meta['checkpoint']}"
  chance = 1.0 / meta["num_classes"]
  records = results["networks"]
  paths.append(
    plots.plot_accuracy_by_split(
      records, os.path.join(out_dir, PLOT_BY_SPLIT), title, chance
    )
  )
  paths.append(
    plots.plot_accuracy_vs_params(
      records, os.path.join(out_dir, PLOT_VS_PARAMS), title, chance
    )
  )
  if any("sgd" in r for r in records):
    paths.append(
      plots.plot_sgd_curves(
        records, os.path.join(out_dir, PLOT_SGD), title, chance
      )
    )
  return paths
