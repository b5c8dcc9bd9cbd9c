"""Fine-tune one network from GHN-predicted parameters and from random init.

Both runs use the original's SGD recipe: batch 96, momentum 0.9, weight
decay 3e-4, cosine learning-rate decay over all steps, gradient norm clipped
to 5. They see the same training batches and are scored on the same test
images every --eval-every steps. Writes finetune.json and finetune.png
(test accuracy against steps, both curves in one plot) to --out.

Examples:

  # Defaults: network 0 of the test split, the `make meta-train` GHN.
  python experiments/finetune.py

  # ResNet-18 for 500 steps on CIFAR-10, scored every 50 steps.
  python experiments/finetune.py --split predefined --arch resnet18 \\
      --dataset cifar10 --steps 500 --eval-every 50
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ghn_jax import evaluate, plots  # noqa: E402
from ghn_jax.eval import checkpoint, cli, datasets, networks, report  # noqa: E402
from ghn_jax.train.checkpoint import quiet_library_logging  # noqa: E402

quiet_library_logging()

DEFAULT_CKPT = os.path.join("workdir", "cpu_default")
DEFAULT_STEPS = 20
DEFAULT_EVAL_EVERY = 5
DEFAULT_TEST_IMAGES = 256
RESULTS_JSON = "finetune.json"
PLOT_FILE = "finetune.png"


def positive_int(text: str) -> int:
  """Parse an integer >= 1 for argparse."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}.")
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
    help="GHN checkpoint: a ghn_jax checkpoint directory, a GHN .npz file "
    "or an original GHN-2 .pt file.",
  )
  parser.add_argument(
    "--dataset",
    default=datasets.DEFAULT_DATASET,
    choices=datasets.EVAL_DATASETS,
    help="images: fashion_mnist (offline) or cifar10 (prepared TFDS).",
  )
  parser.add_argument(
    "--data-dir",
    default=None,
    help="dataset folder (default: the dataset's standard location).",
  )
  parser.add_argument(
    "--split",
    default="test",
    help="split of the network: one of "
    + ", ".join(networks.SPLIT_CHOICES[1:])
    + ".",
  )
  parser.add_argument(
    "--arch",
    default="0",
    help="the network: an index in a DeepNets-1M split, or a predefined "
    "name (" + ", ".join(networks.PREDEFINED) + ").",
  )
  parser.add_argument(
    "--steps",
    type=positive_int,
    default=DEFAULT_STEPS,
    help="SGD steps of each run (batches of --batch-size images).",
  )
  parser.add_argument(
    "--eval-every",
    type=positive_int,
    default=DEFAULT_EVAL_EVERY,
    help="steps between two test-accuracy measurements.",
  )
  parser.add_argument(
    "--test-images",
    type=int,
    default=DEFAULT_TEST_IMAGES,
    help="test images scored at each measurement; 0 for all.",
  )
  parser.add_argument(
    "--lr",
    type=float,
    default=evaluate.SGD_LEARNING_RATE,
    help="initial learning rate of the cosine schedule.",
  )
  parser.add_argument(
    "--batch-size",
    type=positive_int,
    default=evaluate.SGD_BATCH_SIZE,
    help="training images per step.",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the random initialisation and of the image order.",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="output folder (default: <ckpt>/finetune_<dataset>, or "
    "workdir/finetune_<dataset> for a checkpoint file).",
  )
  return parser


def run(args: argparse.Namespace) -> dict:
  """Fine-tune the network `args` names; return a JSON-ready result."""
  spec = networks.list_networks(args.split, args.arch)[0]
  info = datasets.dataset_info(args.dataset)
  ghn = checkpoint.load_ghn(args.ckpt, info.num_classes, info.image_size)
  data = datasets.load_eval_data(
    args.dataset, args.data_dir, test_images=args.test_images, seed=args.seed
  )
  eval_steps = tuple(range(args.eval_every, args.steps + 1, args.eval_every))
  if not eval_steps or eval_steps[-1] != args.steps:
    eval_steps += (args.steps,)
  config = evaluate.SgdConfig(
    eval_steps=eval_steps,
    batch_size=args.batch_size,
    learning_rate=args.lr,
    seed=args.seed,
  )
  net = networks.make_builder(spec, info.num_classes, info.image_size)()
  print(
    f"Fine-tuning {net.name} ({net.num_params:,} parameters) for "
    f"{args.steps} steps on {data.name}"
  )
  curves = evaluate.compare_finetuning(
    net, ghn.predict_fn, data, config, args.seed
  )
  return {
    "meta": {
      "date": datetime.datetime.now(datetime.UTC).strftime(
        "%Y-%m-%d %H:%M UTC"
      ),
      "machine": checkpoint.backend_description(),
      "checkpoint": args.ckpt,
      "dataset": data.name,
      "network": net.name,
      "num_params": net.num_params,
      "test_images": len(data.test),
      "num_classes": data.test.num_classes,
      "sgd": dataclasses.asdict(config),
    },
    "curves": {
      label: dataclasses.asdict(curve) for label, curve in curves.items()
    },
  }


def main(argv: list[str] | None = None) -> int:
  """Parse the command line, fine-tune, write and print the results."""
  args = build_parser().parse_args(argv)
  try:
    results = run(args)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  out_dir = args.out or os.path.join(
    args.ckpt if os.path.isdir(args.ckpt) else "workdir",
    f"finetune_{args.dataset}",
  )
  json_path = os.path.join(out_dir, RESULTS_JSON)
  report.write_json(results, json_path)
  meta = results["meta"]
  plot_path = plots.plot_finetune_curves(
    results["curves"],
    os.path.join(out_dir, PLOT_FILE),
    title=f"{meta['network']} on {meta['dataset']}",
    chance=1.0 / meta["num_classes"],
  )
  print("step | " + " | ".join(results["curves"]))
  steps = next(iter(results["curves"].values()))["steps"]
  for i, step in enumerate(steps):
    accuracies = [
      f"{100 * curve['top1'][i]:.1f} %" for curve in results["curves"].values()
    ]
    print(f"{step} | " + " | ".join(accuracies))
  print(f"Wrote {json_path}, {plot_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
