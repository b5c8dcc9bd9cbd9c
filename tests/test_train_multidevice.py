"""A 4-device meta-training run matches a 1-device run (CPU devices)."""

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
  """
  import sys
  import jax
  import numpy as np
  import tensorflow_datasets as tfds
  from ghn_jax.configs import cpu_default
  from ghn_jax.train import loop

  assert jax.local_device_count() == 4, jax.devices()
  states = []
  for num_devices, workdir in ((1, sys.argv[1]), (4, sys.argv[2])):
    config = cpu_default.get_config()
    config.dataset = "cifar10"
    config.batch_size = 4
    config.ghn.overrides.hid = 8
    config.ghn.overrides.max_shape = (8, 8, 3, 3)
    config.arch.num_architectures = 4
    config.arch.meta_batch_size = 4
    config.arch.channels = (8,)
    config.arch.fc_dims = (8,)
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval.num_architectures = 0
    config.num_devices = num_devices
    with tfds.testing.mock_data(num_examples=8):
      states.append(loop.train_and_evaluate(config, workdir))
  one, four = (jax.tree_util.tree_leaves(s.params) for s in states)
  worst = max(
    float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
    for a, b in zip(one, four)
  )
  print("max relative difference", worst)
  assert worst < 1e-4, worst
  """
)


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _SCRIPT,
      str(tmp_path / "one"),
      str(tmp_path / "four"),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert "max relative difference" in result.stdout
