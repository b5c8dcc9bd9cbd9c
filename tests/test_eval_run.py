"""End-to-end tests of the evaluation: tiny networks, tiny GHN, tiny data."""

import importlib.util
import json
import os

import chex
import jax
import numpy as np
import pytest

from ghn_jax import evaluate
from ghn_jax import ghn as ghn_lib
from ghn_jax.data import pipeline
from ghn_jax.deepnets1m import Genotype, NetConfig, Network
from ghn_jax.eval import checkpoint, datasets, networks, report
from ghn_jax.train import checkpoint as train_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.environ.get(
  "GHN_REFERENCE_DIR",
  os.path.join(REPO_ROOT, "..", "shared", "ghn2_reference"),
)
TINY_GENOTYPE = Genotype(
  normal=(("conv_3x3", 0), ("skip_connect", 1)),
  normal_concat=(2,),
  reduce=(("avg_pool_3x3", 0), ("max_pool_3x3", 1)),
  reduce_concat=(2,),
)
TINY_GHN = dict(hid=8)


def _load_script(name="eval_cifar"):
  path = os.path.join(REPO_ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _save_tiny_ghn(path, **overrides):
  config = ghn_lib.ghn2_config(**{**TINY_GHN, **overrides})
  ghn, variables = ghn_lib.init_ghn(config, jax.random.key(0))
  ghn_lib.save_ghn(str(path), ghn.config, variables)
  return str(path)


def _tiny_data(num_train=128, num_test=80):
  rng = np.random.default_rng(0)
  info = pipeline.get_dataset_info("cifar10")

  def source(num):
    images = rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(num) % info.num_classes).astype(np.int32)
    return pipeline.ArraySource(images, labels)

  return datasets.make_eval_data(
    source(num_train), source(num_test), info, calibration_batches=1
  )


def _tiny_builders():
  builders = []
  for i, norm in enumerate(("bn", None)):
    config = NetConfig(
      genotype=TINY_GENOTYPE, channels=4, num_cells=2, norm=norm
    )

    def build(config=config, i=i):
      return networks.build_eval_net(f"tiny/{i}", "tiny", Network(config), 32)

    builders.append(build)
  return builders


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  path = _save_tiny_ghn(tmp_path_factory.mktemp("ghn") / "ghn.npz")
  ghn = checkpoint.load_ghn(path, num_classes=10, image_size=32)
  config = evaluate.EvalConfig(
    bn_calibrate=1,
    sgd=evaluate.SgdConfig(eval_steps=(1, 2), batch_size=32),
    sgd_num_nets=1,
  )
  return evaluate.evaluate_networks(
    _tiny_builders(),
    ghn.predict_fn,
    _tiny_data(),
    config,
    meta={"date": "today", "machine": "test", "checkpoint": path},
    progress=False,
  )


def test_results_per_network_fields(results):
  records = results["networks"]
  assert [r["name"] for r in records] == ["tiny/0", "tiny/1"]
  for record in records:
    assert record["num_params"] > 0
    assert record["num_nodes"] > 0
    assert record["predict_seconds"] > 0
    for source in ("ghn", "random"):
      for metric in ("top1", "top1_calibrated"):
        assert 0.0 <= record[source][metric] <= 1.0
  assert records[0]["has_batch_norm"]
  assert not records[1]["has_batch_norm"]
  # Without batch norm, calibration cannot change the accuracy.
  assert records[1]["ghn"]["top1_calibrated"] == records[1]["ghn"]["top1"]


def test_results_sgd_on_smallest_network(results):
  with_bn, without_bn = results["networks"]
  # The network without batch norm has fewer parameters, so it is trained.
  assert without_bn["num_params"] < with_bn["num_params"]
  assert "sgd" not in with_bn
  sgd = without_bn["sgd"]
  assert sgd["steps"] == [0, 1, 2]
  assert len(sgd["top1"]) == 3
  # Step 0 is the random initialisation scored above.
  assert sgd["top1"][0] == without_bn["random"]["top1"]
  assert sgd["ghn_equivalent_relation"] in ("<", "=", ">")
  assert 1 <= sgd["ghn_equivalent_steps"] <= 2


def test_results_summary_and_meta(results):
  summary = results["summary"]["splits"]["tiny"]
  assert summary["ghn_top1"]["n"] == 2
  ghn_top1 = [r["ghn"]["top1"] for r in results["networks"]]
  assert summary["ghn_top1"]["mean"] == pytest.approx(np.mean(ghn_top1))
  assert results["summary"]["sgd"]["num_nets"] == 1
  meta = results["meta"]
  assert meta["dataset"] == "cifar10"
  assert meta["test_images"] == 80
  assert meta["test_batch_size"] == 64
  assert meta["sgd"]["eval_steps"] == (1, 2)


def test_report_files(results, tmp_path):
  paths = report.write_report(results, str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(
    [
      report.RESULTS_JSON,
      report.RESULTS_MARKDOWN,
      report.PLOT_BY_SPLIT,
      report.PLOT_VS_PARAMS,
      report.PLOT_SGD,
    ]
  )
  for path in paths:
    assert os.path.getsize(path) > 0
  with open(tmp_path / report.RESULTS_JSON) as f:
    loaded = json.load(f)
  assert loaded["networks"][0]["name"] == "tiny/0"
  with open(tmp_path / report.RESULTS_MARKDOWN) as f:
    markdown = f.read()
  assert "| tiny |" in markdown
  assert "| tiny/1 |" in markdown
  assert "calibrated" in markdown


def test_report_json_writes_nan_as_null(tmp_path):
  path = tmp_path / "x.json"
  report.write_json({"a": float("nan"), "b": [1.0, float("inf")]}, str(path))
  with open(path) as f:
    assert json.load(f) == {"a": None, "b": [1.0, None]}


# --- network lists -----------------------------------------------------------


def test_list_networks_default_covers_all_splits():
  specs = networks.list_networks("all", None, num_nets=2)
  names = [s.name for s in specs]
  assert names[:2] == ["val/0", "val/1"]
  assert len(names) == 2 * len(networks.SPLITS) + len(networks.PREDEFINED)
  assert names[-len(networks.PREDEFINED) :] == list(networks.PREDEFINED)


def test_list_networks_one_arch():
  assert networks.list_networks("wide", "3")[0].name == "wide/3"
  assert networks.list_networks("predefined", "ResNet18")[0].arch == "resnet18"


def test_split_configs_are_fixed_and_wide_is_widened():
  first = networks.split_config("test", 1)
  again = networks.split_config("test", 1)
  wide = networks.split_config("wide", 1)
  assert first == again
  assert wide.channels == 4 * first.channels
  assert networks.split_config("bnfree", 0).norm is None


@pytest.mark.parametrize(
  "split, arch, match",
  [
    ("bogus", None, "Unknown split 'bogus'.*val, test"),
    ("all", "3", "needs a --split"),
    ("predefined", "resnet7", "resnet18, resnet50, vit, darts"),
    ("test", "999", "out of range.*0..499"),
    ("test", "resnet18", "--split predefined"),
  ],
)
def test_list_networks_errors(split, arch, match):
  with pytest.raises(ValueError, match=match):
    networks.list_networks(split, arch)


# --- checkpoints -------------------------------------------------------------


def test_load_ghn_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="make meta-train"):
    checkpoint.load_ghn(str(tmp_path / "none"), 10, 32)


def test_load_ghn_empty_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="make meta-train"):
    checkpoint.load_ghn(str(tmp_path), 10, 32)


def test_load_ghn_wrong_classes(tmp_path):
  path = _save_tiny_ghn(tmp_path / "ghn.npz", num_classes=100)
  with pytest.raises(ValueError, match="100 classes.*has 10"):
    checkpoint.load_ghn(path, 10, 32)


def test_load_ghn_wrong_image_size(tmp_path):
  path = _save_tiny_ghn(
    tmp_path / "ghn.npz", max_shape=ghn_lib.IMAGENET_MAX_SHAPE
  )
  with pytest.raises(ValueError, match="224x224.*32x32"):
    checkpoint.load_ghn(path, 10, 32)


def test_load_ghn_from_directory(tmp_path):
  _save_tiny_ghn(tmp_path / "ghn.npz")
  ghn = checkpoint.load_ghn(str(tmp_path), 10, 32)
  assert ghn.config.hid == TINY_GHN["hid"]
  assert ghn.description["format"].startswith("ghn_jax")


def test_load_ghn_from_orbax_checkpoint(tmp_path):
  config = ghn_lib.ghn2_config(**TINY_GHN)
  ghn, variables = ghn_lib.init_ghn(config, jax.random.key(1))
  manager = train_checkpoint.create_manager(str(tmp_path), max_to_keep=1)
  state = {"step": 7, "params": variables}
  train_checkpoint.save(manager, 7, state, {"ghn_config": config.to_json()})
  manager.close()
  loaded = checkpoint.load_ghn(str(tmp_path), 10, 32)
  assert loaded.description["format"] == "orbax checkpoint, step 7"
  assert loaded.config == config
  chex.assert_trees_all_equal(loaded.variables, variables)


def test_load_ghn_from_ppuda_checkpoint():
  path = os.path.join(REFERENCE_DIR, "ghn_random.pt")
  if not os.path.exists(path):
    pytest.skip(f"{path} not found (set GHN_REFERENCE_DIR)")
  loaded = checkpoint.load_ghn(path, 10, 32)
  assert loaded.description["format"] == "ppuda .pt (converted)"
  assert loaded.config.hid == 32
  assert loaded.config.max_shape == ghn_lib.CIFAR10_MAX_SHAPE
  with pytest.raises(ValueError, match="10 classes"):
    checkpoint.load_ghn(path, 100, 32)


def test_dataset_name_error():
  with pytest.raises(ValueError, match="fashion_mnist.*cifar10"):
    datasets.dataset_info("mnist")


# --- command line ------------------------------------------------------------


def test_cli_help_lists_options(capsys):
  script = _load_script()
  with pytest.raises(SystemExit) as exit_info:
    script.main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for option in (
    "--ckpt",
    "--dataset",
    "--split",
    "--arch",
    "--num-nets",
    "--test-images",
    "--bn-calibrate",
    "--sgd-steps",
    "--sgd-nets",
    "--out",
  ):
    assert option in text


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--ckpt", "/nonexistent/ckpt"], "make meta-train"),
    (["--split", "bogus"], "Unknown split"),
    (["--split", "predefined", "--arch", "resnet7"], "resnet18"),
  ],
)
def test_cli_errors_exit_2(argv, message, capsys):
  script = _load_script()
  assert script.main(argv) == 2
  assert message in capsys.readouterr().err


def test_finetune_cli_help_and_errors(capsys):
  script = _load_script("finetune")
  with pytest.raises(SystemExit) as exit_info:
    script.main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for option in ("--ckpt", "--split", "--arch", "--steps", "--eval-every"):
    assert option in text
  assert script.main(["--ckpt", "/nonexistent/ckpt"]) == 2
  assert "make meta-train" in capsys.readouterr().err
  assert script.main(["--split", "test", "--arch", "x"]) == 2
  assert "index" in capsys.readouterr().err


def test_cli_rejects_bad_sgd_steps(capsys):
  script = _load_script()
  with pytest.raises(SystemExit) as exit_info:
    script.main(["--sgd-steps", "10,1"])
  assert exit_info.value.code == 2
  assert "increasing" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_default_run(tmp_path):
  """The default command on the offline dataset, with a random GHN."""
  script = _load_script()
  ckpt = _save_tiny_ghn(tmp_path / "ghn.npz", hid=32)
  out = tmp_path / "out"
  assert script.main(["--ckpt", ckpt, "--out", str(out), "--no-progress"]) == 0
  with open(out / report.RESULTS_JSON) as f:
    results = json.load(f)
  splits = set(results["summary"]["splits"])
  assert splits == {*networks.SPLITS, networks.PREDEFINED_SPLIT}
  assert results["meta"]["dataset"] == "fashion_mnist"


def test_compare_finetuning_curves(tmp_path):
  path = _save_tiny_ghn(tmp_path / "ghn.npz")
  ghn = checkpoint.load_ghn(path, num_classes=10, image_size=32)
  net = _tiny_builders()[0]()
  config = evaluate.SgdConfig(eval_steps=(1, 3), batch_size=32)
  curves = evaluate.compare_finetuning(
    net, ghn.predict_fn, _tiny_data(), config
  )
  assert set(curves) == {
    evaluate.FINETUNE_GHN_LABEL,
    evaluate.FINETUNE_RANDOM_LABEL,
  }
  for curve in curves.values():
    assert curve.steps == (0, 1, 3)
    assert len(curve.losses) == 3
    assert all(0.0 <= a <= 1.0 for a in curve.top1)
  # The two runs start from different parameters.
  ghn_curve = curves[evaluate.FINETUNE_GHN_LABEL]
  random_curve = curves[evaluate.FINETUNE_RANDOM_LABEL]
  assert ghn_curve.losses[0] != random_curve.losses[0]


def test_compare_finetuning_needs_training_data(tmp_path):
  path = _save_tiny_ghn(tmp_path / "ghn.npz")
  ghn = checkpoint.load_ghn(path, num_classes=10, image_size=32)
  data = evaluate.EvalData(_tiny_data().test)
  with pytest.raises(ValueError, match="training images"):
    evaluate.compare_finetuning(
      _tiny_builders()[0](), ghn.predict_fn, data, evaluate.SgdConfig()
    )


def test_load_eval_data_cifar10_mock():
  import tensorflow_datasets as tfds  # noqa: PLC0415

  with tfds.testing.mock_data(num_examples=100):
    data = datasets.load_eval_data(
      "cifar10", test_images=70, calibration_batches=1
    )
    images, labels = next(data.train_batches_fn(32, 0))
  assert data.name == "cifar10"
  assert data.test.images.shape == (70, 32, 32, 3)
  assert data.test.images.dtype == np.float32
  assert data.calibration.images.shape == (64, 32, 32, 3)
  assert images.shape == (32, 32, 32, 3)
  assert labels.shape == (32,)
  assert np.all((data.test.labels >= 0) & (data.test.labels < 10))
