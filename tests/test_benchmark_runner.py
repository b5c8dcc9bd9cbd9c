"""Tests of the benchmark runner's table arithmetic and argument checks."""

import importlib.util
import pathlib

import pytest

RUNNER_PATH = (
  pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
)


@pytest.fixture(scope="module")
def runner():
  spec = importlib.util.spec_from_file_location("bench_runner", RUNNER_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ratio_time_lower_is_better(runner):
  assert runner._ratio(0.1, 0.8, "s") == "8.0x"


def test_ratio_rate_higher_is_better(runner):
  assert runner._ratio(30.0, 10.0, "archs/s") == "3.0x"


def test_ratio_without_baseline(runner):
  assert runner._ratio(1.0, None, "s") == "-"


def test_format_value_magnitudes(runner):
  assert runner._format_value(1234.5) == "1,234"
  assert runner._format_value(3.14159) == "3.14"
  assert runner._format_value(0.012345) == "0.0123"
  assert runner._format_value(None) == "-"


def test_unknown_benchmark_name_exits(runner):
  with pytest.raises(SystemExit, match="unknown benchmark"):
    runner._discover(["no_such_benchmark"])
