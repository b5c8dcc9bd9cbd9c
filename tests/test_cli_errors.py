"""Tests of the command-line tools' error messages and log levels."""

import logging
import os
import subprocess
import sys

from absl import logging as absl_logging

from ghn_jax.train import checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_TRAIN = os.path.join(REPO_ROOT, "experiments", "meta_train.py")
ORBAX_PATH_PART = os.sep + "orbax" + os.sep


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


def test_quiet_logging_hides_orbax_info(tmp_path, caplog):
  checkpoint.quiet_library_logging()
  caplog.set_level(logging.INFO)
  manager = checkpoint.create_manager(str(tmp_path), max_to_keep=1)
  manager.close()
  absl_logging.info("project line")
  absl_logging.warning("project warning")
  orbax_records = [r for r in caplog.records if ORBAX_PATH_PART in r.pathname]
  messages = [r.getMessage() for r in caplog.records]
  assert orbax_records == []
  assert "project line" in messages
  assert "project warning" in messages
  jax_level = logging.getLogger("jax._src.xla_bridge").getEffectiveLevel()
  assert jax_level == logging.WARNING
