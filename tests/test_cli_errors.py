"""Tests of the command-line tools' error messages and log levels."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_TRAIN = os.path.join(REPO_ROOT, "experiments", "meta_train.py")


def run_meta_train(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, META_TRAIN, *args],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=120,
  )


def test_meta_train_missing_config_file():
  result = run_meta_train("--config", "/nonexistent.py", "--workdir", "unused")
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0
  assert len(lines) == 1
  assert "/nonexistent.py" in lines[0]
  assert "not found" in lines[0]
  assert "ghn_jax/configs/cpu_default.py" in lines[0]
  assert "Traceback" not in result.stderr


def test_meta_train_unknown_config_field():
  for field in ("nosuch", "arch.nosuch"):
    result = run_meta_train(f"--config.{field}=3", "--workdir", "unused")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1
    assert repr(field) in lines[0]
    assert "does not exist" in lines[0]
    assert "--print_config" in lines[0]


def test_meta_train_print_config_override():
  result = run_meta_train(
    "--config.arch.meta_batch_size=2", "--print_config", "--workdir", "unused"
  )
  assert result.returncode == 0, result.stderr
  assert "meta_batch_size: 2" in result.stdout
