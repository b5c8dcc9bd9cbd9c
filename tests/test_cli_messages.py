"""Error messages, help text and file modes of the command-line tools."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from ghn_jax.deepnets1m import dataset as dataset_lib
from ghn_jax.deepnets1m import sampler as sampler_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
COMMAND_TIMEOUT_S = 120


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    timeout=COMMAND_TIMEOUT_S,
    cwd=REPO,
  )


@pytest.mark.parametrize(
  "flag, value, message",
  [
    ("--num", "0", "flag --num=0"),
    ("--workers", "0", "flag --workers=0"),
    ("--shard_size", "0", "flag --shard_size=0"),
    ("--split", "nope", "train|val|test|search|wide|deep|dense|bnfree"),
  ],
)
def test_generate_nets_rejects_bad_flag(tmp_path, flag, value, message):
  out = tmp_path / "out"
  result = _run(
    [str(EXPERIMENTS / "generate_nets.py"), flag, value, "--out", str(out)]
  )
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not out.exists()


@pytest.mark.parametrize("name", ["num", "shard_size", "num_workers"])
def test_generate_split_rejects_zero(tmp_path, name):
  kwargs = {"num": 2, "shard_size": 1, "num_workers": 1, name: 0}
  num = kwargs.pop("num")
  with pytest.raises(ValueError, match=rf"{name}=0 is invalid"):
    dataset_lib.generate_split(
      str(tmp_path), "test", num, progress=False, **kwargs
    )


def test_generate_split_lists_valid_splits(tmp_path):
  with pytest.raises(ValueError, match="expected one of") as info:
    dataset_lib.generate_split(str(tmp_path), "nope", 2, progress=False)
  for split in sampler_lib.SPLITS:
    assert split in str(info.value)
