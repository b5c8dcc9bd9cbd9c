"""Run the speed benchmarks and print one table of named figures.

Each `benchmarks/bench_*.py` module defines `run()`, which returns rows of
(name, value, unit, baseline): `baseline` is the PyTorch original's figure for
the same measurement on the same machine, or None where there is none. Values
are medians over several runs, measured inside this process.

Usage:
  python benchmarks/run.py                # every benchmark
  python benchmarks/run.py ghn graph      # only bench_ghn.py, bench_graph.py
  python benchmarks/run.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback

BENCH_DIR = pathlib.Path(__file__).resolve().parent


def _discover(names: list[str]) -> list[pathlib.Path]:
  """Return the benchmark files to run, all of them when `names` is empty."""
  available = sorted(BENCH_DIR.glob("bench_*.py"))
  if not names:
    return available
  by_name = {path.stem.removeprefix("bench_"): path for path in available}
  unknown = [name for name in names if name not in by_name]
  if unknown:
    raise SystemExit(
      f"unknown benchmark(s) {unknown}; available: {sorted(by_name)}"
    )
  return [by_name[name] for name in names]


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _format_value(value: float) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if abs(value) >= 100:
    return f"{value:,.0f}"
  if abs(value) >= 1:
    return f"{value:.2f}"
  return f"{value:.3g}"


def _ratio(value, baseline, unit: str) -> str:
  """Return how many times better than the original the value is."""
  if baseline is None or value is None or value == 0 or baseline == 0:
    return "-"
  # Times and memory: lower is better; rates: higher is better.
  if unit.endswith("/s"):
    return f"{value / baseline:.1f}x"
  return f"{baseline / value:.1f}x"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=(
      "Run the ghn_jax speed benchmarks and print medians side by side "
      "with the PyTorch original's figures on the same machine."
    )
  )
  parser.add_argument(
    "names",
    nargs="*",
    help="benchmarks to run (file names without bench_ and .py); all "
    "by default",
  )
  parser.add_argument(
    "--json", type=pathlib.Path, help="also write the rows to this file"
  )
  args = parser.parse_args(argv)
  sys.path.insert(0, str(BENCH_DIR.parent))

  rows = []
  failed = []
  for path in _discover(args.names):
    start = time.perf_counter()
    print(f"running {path.name} ...", file=sys.stderr, flush=True)
    try:
      module_rows = _load(path).run()
    except Exception:  # noqa: BLE001 - report and go on with the others.
      traceback.print_exc()
      failed.append(path.name)
      continue
    elapsed = time.perf_counter() - start
    print(f"  done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    rows.extend((path.stem, *row) for row in module_rows)

  stamp = datetime.datetime.now(datetime.UTC)
  print(
    f"\nghn_jax benchmarks, {stamp:%Y-%m-%d %H:%M} UTC, "
    f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
    f"{platform.python_version()}\n"
  )
  header = ("benchmark", "figure", "ghn_jax", "unit", "original", "gain")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for bench, name, value, unit, baseline in rows:
    cells = (
      bench.removeprefix("bench_"),
      name,
      _format_value(value),
      unit,
      _format_value(baseline),
      _ratio(value, baseline, unit),
    )
    print("| " + " | ".join(cells) + " |")

  if args.json:
    records = [
      dict(benchmark=b, name=n, value=v, unit=u, baseline=base)
      for b, n, v, u, base in rows
    ]
    args.json.write_text(json.dumps(records, indent=1))
  if failed:
    print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
