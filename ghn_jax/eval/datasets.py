"""Evaluation images from the pipelines of `ghn_jax.data`.

The test set, the batch-norm calibration images and the SGD training batches
are preprocessed exactly as in meta-training (`ghn_jax.data.pipeline`): the
same normalisation, and for training batches the same augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ghn_jax.data import pipeline
from ghn_jax.evaluate import TEST_BATCH_SIZE, EvalData, ImageData

# Datasets the evaluation accepts: 32x32 images, as the predefined networks
# are adjusted to CIFAR-sized inputs.
EVAL_DATASETS = ("fashion_mnist", "cifar10")
DEFAULT_DATASET = "fashion_mnist"
# How each dataset is obtained, for reports.
DATASET_DESCRIPTIONS = {
  "fashion_mnist": "Fashion-MNIST, offline from Debian's "
  "dataset-fashion-mnist, zero-padded to 32x32 and repeated to 3 channels",
  "cifar10": "CIFAR-10 from a prepared TFDS dataset",
}


def dataset_info(name: str) -> pipeline.DatasetInfo:
  """Return a dataset's description (classes, image size, normalisation).

  Raises:
    ValueError: for a dataset the evaluation does not support.
  """
  if name not in EVAL_DATASETS:
    raise ValueError(
      f"Unknown or unsupported dataset {name!r}: use one of "
      f"{list(EVAL_DATASETS)}."
    )
  return pipeline.get_dataset_info(name)


def _to_image_data(
  source: pipeline.RandomAccessSource,
  info: pipeline.DatasetInfo,
  indices: np.ndarray,
) -> ImageData:
  """Gather and normalise (without augmentation) the examples at `indices`."""
  preprocess = pipeline.make_preprocess_fn(info, train=False)
  records = [source[int(i)] for i in indices]
  images = np.stack([np.asarray(r["image"]) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int32)
  rng = np.random.default_rng(0)
  return ImageData(
    preprocess(images, rng).astype(np.float32),
    labels,
    info.name,
    info.num_classes,
  )


def make_eval_data(
  source_train: pipeline.RandomAccessSource | None,
  source_test: pipeline.RandomAccessSource,
  info: pipeline.DatasetInfo,
  test_images: int = 0,
  calibration_batches: int = 0,
  seed: int = 0,
) -> EvalData:
  """Build `EvalData` from random-access sources (TFDS or in-memory).

  Args:
    source_train: training split; None disables calibration and SGD.
    source_test: test split.
    info: the dataset's description (normalisation, classes).
    test_images: the first this many test images; 0 for all.
    calibration_batches: batches of 64 training images to hold for
      batch-norm calibration (a fixed random subset); 0 for none.
    seed: seed of the calibration subset.

  Returns:
    The evaluation data.
  """
  num_test = len(source_test) if test_images <= 0 else test_images
  num_test = min(num_test, len(source_test))
  test = _to_image_data(source_test, info, np.arange(num_test))

  calibration = None
  train_batches_fn = None
  if source_train is not None:
    if calibration_batches > 0:
      rng = np.random.default_rng(seed)
      num = min(calibration_batches * TEST_BATCH_SIZE, len(source_train))
      indices = rng.choice(len(source_train), size=num, replace=False)
      calibration = _to_image_data(source_train, info, indices)

    def train_batches_fn(
      batch_size: int, stream_seed: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
      stream = pipeline.ImageBatchStream(
        source_train, info, batch_size, stream_seed, train=True
      )
      for batch in stream:
        yield batch["image"], batch["label"]

  return EvalData(test, calibration, train_batches_fn)


def load_eval_data(
  name: str = DEFAULT_DATASET,
  data_dir: str | None = None,
  test_images: int = 0,
  calibration_batches: int = 0,
  with_training: bool = True,
  seed: int = 0,
) -> EvalData:
  """Load a dataset's test split (and training split) for evaluation.

  Args:
    name: 'fashion_mnist' (offline, Debian's dataset-fashion-mnist) or
      'cifar10' (a prepared TFDS dataset).
    data_dir: dataset folder; None for the default location.
    test_images: the first this many test images; 0 for all.
    calibration_batches: batches of 64 training images for batch-norm
      calibration; 0 for none.
    with_training: also open the training split (for calibration, SGD and
      fine-tuning).
    seed: seed of the calibration subset.

  Returns:
    The evaluation data.

  Raises:
    ValueError: for an unsupported dataset name.
    FileNotFoundError: if the dataset is not installed or prepared.
  """
  info = dataset_info(name)
  source_test = pipeline.load_source(name, info.eval_split, data_dir)
  source_train = (
    pipeline.load_source(name, "train", data_dir) if with_training else None
  )
  return make_eval_data(
    source_train, source_test, info, test_images, calibration_batches, seed
  )
