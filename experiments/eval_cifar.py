"""Evaluate a GHN's predicted parameters on DeepNets-1M and predefined nets.

For every network, the GHN predicts all parameters (timed). The network is
scored by top-1 accuracy on the test images, with batch norm using the
statistics of each test batch of 64 (the GHN-2 protocol), and optionally
also with running statistics calibrated on training batches. The same
network is scored with random initialisation. On a subset of networks, SGD
from random initialisation gives the number of SGD steps one GHN forward
pass is worth.
Writes results.json, results.md and PNG plots to --out.

Examples:

  # Defaults: the checkpoint of `make meta-train`, offline Fashion-MNIST.
  python experiments/eval_cifar.py

  # A checkpoint converted on the fly from the original's release, CIFAR-10.
  python experiments/eval_cifar.py --ckpt ghn2_cifar10.pt --dataset cifar10 \\
      --num-nets 100 --test-images 0 --sgd-steps 1,10,100,1000

  # One network: architecture 3 of the wide split.
  python experiments/eval_cifar.py --split wide --arch 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ghn_jax import evaluate  # noqa: E402
from ghn_jax.eval import checkpoint, cli, datasets, networks, report  # noqa: E402
from ghn_jax.train.checkpoint import quiet_library_logging  # noqa: E402

quiet_library_logging()

DEFAULT_CKPT = os.path.join("workdir", "cpu_default")
DEFAULT_NUM_NETS = 1
DEFAULT_TEST_IMAGES = 256
DEFAULT_SGD_STEPS = "1,10"
DEFAULT_SGD_NETS = 1
EVAL_SUBDIR = "eval"


def parse_steps(text: str) -> tuple[int, ...]:
  """Parse '1,10,100' into (1, 10, 100); '' or '0' means no SGD baseline."""
  text = text.strip()
  if text in ("", "0"):
    return ()
  try:
    steps = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"--sgd-steps must be comma-separated integers, got {text!r}."
    ) from None
  if min(steps) < 1 or list(steps) != sorted(set(steps)):
    raise argparse.ArgumentTypeError(
      f"--sgd-steps must be increasing positive integers, got {text!r}."
    )
  return steps


def non_negative_int(text: str) -> int:
  """Parse an integer >= 0 for argparse."""
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}.")
  return value


def build_parser() -> argparse.ArgumentParser:
  """Build the command-line parser."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=cli.DefaultsHelpFormatter,
  )
  parser.add_argument(
    "--ckpt",
    default=DEFAULT_CKPT,
    help="GHN checkpoint: a ghn_jax checkpoint directory (as written by "
    "`make meta-train`), a GHN .npz file (as written by "
    "ghn_jax.ghn.save_ghn), or an original GHN-2 .pt file, converted on the "
    "fly.",
  )
  parser.add_argument(
    "--dataset",
    default=datasets.DEFAULT_DATASET,
    choices=datasets.EVAL_DATASETS,
    help="test images: fashion_mnist (offline, Debian's "
    "dataset-fashion-mnist, padded to 32x32x3) or cifar10 (a prepared TFDS "
    "dataset).",
  )
  parser.add_argument(
    "--data-dir",
    default=None,
    help="dataset folder (default: the dataset's standard location).",
  )
  parser.add_argument(
    "--split",
    default="all",
    help="which networks: one of "
    + ", ".join(networks.SPLIT_CHOICES)
    + "; 'all' is every DeepNets-1M evaluation split and the predefined "
    "networks.",
  )
  parser.add_argument(
    "--arch",
    default=None,
    help="one network of --split: an index in a DeepNets-1M split, or a "
    "name of the predefined split (" + ", ".join(networks.PREDEFINED) + ").",
  )
  parser.add_argument(
    "--num-nets",
    type=non_negative_int,
    default=DEFAULT_NUM_NETS,
    help="networks per DeepNets-1M split (the first N of the split, which "
    "is generated with a fixed seed); 0 for the whole split.",
  )
  parser.add_argument(
    "--test-images",
    type=non_negative_int,
    default=DEFAULT_TEST_IMAGES,
    help="test images to score on (the first N of the test split); 0 for "
    "all 10,000.",
  )
  parser.add_argument(
    "--bn-calibrate",
    type=non_negative_int,
    default=0,
    metavar="N",
    help="also score with running batch-norm statistics averaged over N "
    "training batches of 64 images; 0 disables it.",
  )
  parser.add_argument(
    "--sgd-steps",
    type=parse_steps,
    default=parse_steps(DEFAULT_SGD_STEPS),
    metavar="K1,K2,...",
    help="SGD baseline: train from random initialisation for max(K) steps "
    f"(batch {evaluate.SGD_BATCH_SIZE}, momentum {evaluate.SGD_MOMENTUM}, "
    f"weight decay {evaluate.SGD_WEIGHT_DECAY}, cosine schedule over "
    "max(K) steps) and score after each K steps; '0' disables it.",
  )
  parser.add_argument(
    "--sgd-nets",
    type=non_negative_int,
    default=DEFAULT_SGD_NETS,
    help="networks that get the SGD baseline: the N smallest (by parameter "
    "count) of the evaluated ones; 0 for all.",
  )
  parser.add_argument(
    "--sgd-lr",
    type=float,
    default=evaluate.SGD_LEARNING_RATE,
    help="initial SGD learning rate.",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the random initialisation, the SGD image order and "
    "the calibration images (the architectures have their own fixed seeds).",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="output folder for results.json, results.md and the PNGs "
    f"(default: <ckpt>/{EVAL_SUBDIR}_<dataset>, or "
    f"workdir/{EVAL_SUBDIR}_<dataset> for a checkpoint file).",
  )
  parser.add_argument(
    "--no-progress", action="store_true", help="hide the progress bar."
  )
  return parser


def default_out_dir(ckpt: str, dataset: str) -> str:
  """Return the output folder used when --out is not given."""
  name = f"{EVAL_SUBDIR}_{dataset}"
  if os.path.isdir(ckpt):
    return os.path.join(ckpt, name)
  return os.path.join("workdir", name)


def make_eval_config(args: argparse.Namespace) -> evaluate.EvalConfig:
  """Build the measurement settings from the command line."""
  sgd = None
  if args.sgd_steps:
    sgd = evaluate.SgdConfig(
      eval_steps=args.sgd_steps, learning_rate=args.sgd_lr, seed=args.seed
    )
  return evaluate.EvalConfig(
    bn_calibrate=args.bn_calibrate,
    sgd=sgd,
    sgd_num_nets=args.sgd_nets,
    seed=args.seed,
  )


def run(args: argparse.Namespace) -> dict:
  """Run the evaluation that `args` describes; return the results."""
  # Cheap checks first, so that bad input fails before data is loaded.
  specs = networks.list_networks(
    split=args.split, arch=args.arch, num_nets=args.num_nets
  )
  info = datasets.dataset_info(args.dataset)
  ghn = checkpoint.load_ghn(args.ckpt, info.num_classes, info.image_size)
  config = make_eval_config(args)

  data = datasets.load_eval_data(
    args.dataset,
    args.data_dir,
    test_images=args.test_images,
    calibration_batches=args.bn_calibrate,
    with_training=bool(args.bn_calibrate or args.sgd_steps),
    seed=args.seed,
  )
  print(
    f"Evaluating {report.count_noun(len(specs), 'network')} on {data.name} "
    f"({datasets.DATASET_DESCRIPTIONS[data.name]}; {len(data.test)} test "
    f"images) with the GHN from {args.ckpt}"
  )

  meta = {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
    f"{checkpoint.backend_description()}",
    "checkpoint": args.ckpt,
    "dataset_description": datasets.DATASET_DESCRIPTIONS[data.name],
    "ghn": ghn.description,
    "command": " ".join(sys.argv),
  }
  builders = [
    networks.make_builder(spec, data.test.num_classes, data.test.image_size)
    for spec in specs
  ]
  start = time.perf_counter()
  results = evaluate.evaluate_networks(
    builders, ghn.predict_fn, data, config, meta, not args.no_progress
  )
  results["meta"]["total_seconds"] = time.perf_counter() - start
  return results


def main(argv: list[str] | None = None) -> int:
  """Parse the command line, evaluate, write and print the results."""
  args = build_parser().parse_args(argv)
  try:
    results = run(args)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  out_dir = args.out or default_out_dir(args.ckpt, args.dataset)
  paths = report.write_report(results, out_dir)
  print()
  print(report.format_markdown(results))
  print("Wrote " + ", ".join(paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
