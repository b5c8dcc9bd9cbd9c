"""Error messages, help text and file modes of the command-line tools."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
import warnings

import flax.linen as nn
import pytest

from ghn_jax import graph_builder
from ghn_jax.deepnets1m import dataset as dataset_lib
from ghn_jax.deepnets1m import sampler as sampler_lib
from ghn_jax.eval import report

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


@pytest.fixture
def umask_027():
  """Set the umask to 0o027 for one test, so modes differ from mkstemp's."""
  previous = os.umask(0o027)
  yield 0o027
  os.umask(previous)


def _mode(path: pathlib.Path) -> int:
  return stat.S_IMODE(path.stat().st_mode)


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


def test_generated_files_follow_umask(tmp_path, umask_027):
  dataset_lib.generate_split(
    str(tmp_path), "test", 2, shard_size=1, progress=False
  )
  files = sorted(tmp_path.iterdir())
  names = [path.name for path in files]
  assert dataset_lib.META_FILE in names
  assert sum(name.startswith("shard_") for name in names) == 2
  assert not [name for name in names if name.endswith(".tmp")]
  for path in files:
    assert _mode(path) == 0o666 & ~umask_027, path.name


class _SingleDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))


def test_graph_cache_file_follows_umask(tmp_path, umask_027):
  graph_builder.clear_cache()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", graph_builder.UnsupportedLayerWarning)
    graph_builder.build_graph_with_report(
      _SingleDense(), input_shape=(1, 4), cache_dir=tmp_path
    )
  files = list(tmp_path.iterdir())
  assert len(files) == 1
  assert files[0].suffix == ".npz"
  assert _mode(files[0]) == 0o666 & ~umask_027


def test_plot_graph_unknown_model_one_line(tmp_path):
  result = _run(
    [
      "-m",
      "ghn_jax.plot_graph",
      "--model=nosuch",
      f"--output={tmp_path / 'graph.png'}",
    ]
  )
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "'nosuch'" in lines[0]
  assert "resnet50" in lines[0]
  assert not (tmp_path / "graph.png").exists()


@pytest.mark.parametrize("script", ["eval_cifar.py", "finetune.py"])
def test_help_shows_no_none_default(script):
  result = _run([str(EXPERIMENTS / script), "--help"])
  assert result.returncode == 0, result.stderr
  # argparse wraps the help text, so compare with single spaces.
  text = " ".join(result.stdout.split())
  assert "(default: None)" not in text
  assert "a GHN .npz file" in text
  assert "(default: <ckpt>/" in text
  assert "(default: the dataset's standard location)" in text


def test_count_noun_singular_and_plural():
  assert report.count_noun(1, "network") == "1 network"
  assert report.count_noun(0, "network") == "0 networks"
  assert report.count_noun(2, "network") == "2 networks"


def _results(top1: list[float]) -> dict:
  """Return the minimal results dict that `format_split_table` reads."""
  n = len(top1)
  mean = sum(top1) / n
  std = 0.0
  if n > 1:
    std = (sum((a - mean) ** 2 for a in top1) / (n - 1)) ** 0.5
  summary = {"n": n, "mean": mean, "std": std, "se": 0.0}
  return {
    "meta": {"bn_calibrate": 0},
    "summary": {
      "splits": {
        "test": {
          "num_params": {"n": n, "mean": 1000.0},
          "ghn_top1": summary,
          "random_top1": summary,
          "predict_seconds": {"mean": 0.5},
        }
      }
    },
  }


def test_split_table_one_network_has_no_std():
  row = report.format_split_table(_results([0.031])).splitlines()[-1]
  assert "+-" not in row
  assert "| 3.1 |" in row


def test_split_table_two_networks_has_std():
  row = report.format_split_table(_results([0.2, 0.4])).splitlines()[-1]
  assert "| 30.0 +- 14.1 |" in row
