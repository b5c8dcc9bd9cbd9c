"""Image batch streams for meta-training: Fashion-MNIST, CIFAR-10, ImageNet.

A stream is an endless, resumable iterator of batches. Epoch `e` visits the
examples in the order of a permutation drawn from `(seed, e)`, and batch `b`
of that epoch draws its augmentation from `(seed, e, b)`, so that the stream
position `(epoch, batch)` fully determines every later batch: a run restored
from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging

from ghn_jax.data import augment, fashion_mnist

CIFAR_PADDING = 4
_TFDS_PREPARE_HINT = (
  "To prepare it: `pip install ghn_jax[tf]` (TensorFlow), then "
  "`tfds build {name} --data_dir={data_dir} --file_format=array_record` or "
  "`tfds.builder({name!r}, data_dir={data_dir!r}, "
  "file_format='array_record').download_and_prepare()` in Python. If it is "
  "prepared elsewhere, pass that folder as the data dir (`--data-dir` of "
  "the experiment scripts, `config.data_dir` of meta-training)."
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of an image classification dataset."""

  name: str
  num_classes: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  eval_split: str


DATASETS = {
  "fashion_mnist": DatasetInfo(
    "fashion_mnist",
    fashion_mnist.NUM_CLASSES,
    fashion_mnist.IMAGE_SIZE,
    fashion_mnist.MEAN,
    fashion_mnist.STD,
    "test",
  ),
  "cifar10": DatasetInfo(
    "cifar10",
    10,
    32,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    "test",
  ),
  "imagenet2012": DatasetInfo(
    "imagenet2012",
    1000,
    augment.IMAGENET_CROP,
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
    "validation",
  ),
}


def get_dataset_info(name: str) -> DatasetInfo:
  """Return the `DatasetInfo` of a dataset name.

  Raises:
    ValueError: if the name is unknown.
  """
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset {name!r}: use one of {sorted(DATASETS)}."
    )
  return DATASETS[name]


class RandomAccessSource(Protocol):
  """A sized source of examples readable by index (like TFDS sources)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArraySource:
  """In-memory images and labels exposed as a random-access source."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the images and labels at `indices` in one gather."""
    return self.images[indices], self.labels[indices]


def load_tfds_source(
  name: str, split: str, data_dir: str | None = None
) -> RandomAccessSource:
  """Open a TFDS dataset as a random-access source (no TensorFlow needed).

  The dataset must already be prepared in the array_record format. If it is
  not and TensorFlow is installed, it is downloaded and prepared first.

  Raises:
    FileNotFoundError: if the dataset is not prepared and TensorFlow is
      missing; the message says how to prepare it.
  """
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except (
    tfds.core.DatasetNotFoundError,
    FileNotFoundError,
    # Raised when only a TFRecord copy of the dataset exists.
    NotImplementedError,
    # Raised as "splits is empty" when TFDS finds the dataset's metadata
    # (for example its built-in copy) but no prepared split.
    KeyError,
  ) as error:
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      resolved_dir = data_dir or tfds.core.constants.DATA_DIR
      hint = _TFDS_PREPARE_HINT.format(name=name, data_dir=resolved_dir)
      raise FileNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
        f"data dir {resolved_dir!r}. {hint}"
      ) from error

  logging.info("Preparing TFDS dataset %s in %s.", name, data_dir)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return tfds.data_source(name, split=split, data_dir=data_dir)


def load_source(
  name: str, split: str, data_dir: str | None = None
) -> RandomAccessSource:
  """Open one split of a dataset as a random-access source.

  Args:
    name: "fashion_mnist" (read from its IDX files), "cifar10" or
      "imagenet2012" (read through TFDS).
    split: "train", or the dataset's evaluation split ("test" for
      Fashion-MNIST and CIFAR-10, "validation" for ImageNet).
    data_dir: dataset folder; None for the default location.

  Returns:
    The source; Fashion-MNIST comes as an in-memory `ArraySource`.
  """
  get_dataset_info(name)
  if name == "fashion_mnist":
    images, labels = fashion_mnist.load_fashion_mnist(split, data_dir)
    source = ArraySource(images, labels)
  else:
    source = load_tfds_source(name, split, data_dir)
  logging.info("Dataset %s, split %s: %d examples.", name, split, len(source))
  return source


def _gather(
  source: RandomAccessSource, indices: np.ndarray
) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
  """Read the examples at `indices` (one gather for in-memory sources)."""
  if isinstance(source, ArraySource):
    return source.take(indices)
  records = [source[int(i)] for i in indices]
  images = [np.asarray(r["image"]) for r in records]
  labels = np.asarray([r["label"] for r in records], np.int32)
  return images, labels


def make_preprocess_fn(
  info: DatasetInfo, train: bool
) -> Callable[
  [Sequence[np.ndarray] | np.ndarray, np.random.Generator], np.ndarray
]:
  """Build the batch preprocessing of a dataset: augment, then normalise."""

  def preprocess(images, rng: np.random.Generator) -> np.ndarray:
    if info.name == "imagenet2012":
      if train:
        images = [augment.random_resized_crop(im, rng) for im in images]
      else:
        images = [augment.center_crop(im) for im in images]
      images = np.stack(images)
    else:
      images = np.stack(images) if isinstance(images, list) else images
      if train:
        images = augment.random_crop_flip(images, rng, CIFAR_PADDING)
    return augment.normalize(images, info.mean, info.std)

  return preprocess


class ImageBatchStream:
  """Endless, resumable stream of shuffled, augmented image batches.

  Each batch is a dict with "image" float32 (B, H, W, 3) normalised per
  channel and "label" int32 (B,). Training streams drop the last partial
  batch of each epoch.
  """

  def __init__(
    self,
    source: RandomAccessSource,
    info: DatasetInfo,
    batch_size: int,
    seed: int,
    train: bool = True,
  ):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if len(source) < batch_size:
      raise ValueError(
        f"Dataset {info.name} has {len(source)} examples, fewer than "
        f"batch_size={batch_size}: lower the batch size."
      )
    self.source = source
    self.info = info
    self.batch_size = batch_size
    self.seed = seed
    self.train = train
    self.batches_per_epoch = len(source) // batch_size
    self.epoch = 0
    self.batch = 0
    self._order = None
    self._order_epoch = -1
    self._preprocess = make_preprocess_fn(info, train)

  def get_state(self) -> dict[str, int]:
    """Return the stream position, to store in a checkpoint."""
    return {"epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict[str, int]) -> None:
    """Move the stream to a position saved by `get_state`."""
    self.epoch = int(state["epoch"])
    self.batch = int(state["batch"])

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      if self.train:
        rng = np.random.default_rng((self.seed, self.epoch))
        self._order = rng.permutation(len(self.source))
      else:
        self._order = np.arange(len(self.source))
      self._order_epoch = self.epoch
    return self._order

  def __iter__(self) -> ImageBatchStream:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    order = self._epoch_order()
    start = self.batch * self.batch_size
    indices = order[start : start + self.batch_size]
    images, labels = _gather(self.source, indices)
    rng = np.random.default_rng((self.seed, self.epoch, self.batch, 1))
    batch = {"image": self._preprocess(images, rng), "label": labels}

    self.batch += 1
    if self.batch >= self.batches_per_epoch:
      self.epoch += 1
      self.batch = 0
    return batch


def create_train_stream(
  name: str, batch_size: int, seed: int, data_dir: str | None = None
) -> ImageBatchStream:
  """Open a dataset's training split as an augmented batch stream."""
  info = get_dataset_info(name)
  source = load_source(name, "train", data_dir)
  return ImageBatchStream(source, info, batch_size, seed, train=True)


def iterate_eval_batches(
  name: str,
  batch_size: int,
  data_dir: str | None = None,
  max_examples: int | None = None,
):
  """Yield the evaluation split in order, without augmentation.

  The last batch may be smaller than `batch_size`.

  Args:
    name: dataset name (see `load_source`).
    batch_size: examples per batch.
    data_dir: dataset folder; None for the default location.
    max_examples: stop after this many examples (all if None).

  Yields:
    Dicts with "image" float32 (B, H, W, 3) and "label" int32 (B,).
  """
  info = get_dataset_info(name)
  source = load_source(name, info.eval_split, data_dir)
  preprocess = make_preprocess_fn(info, train=False)
  total = (
    len(source) if max_examples is None else min(max_examples, len(source))
  )
  rng = np.random.default_rng(0)
  for start in range(0, total, batch_size):
    indices = np.arange(start, min(start + batch_size, total))
    images, labels = _gather(source, indices)
    yield {"image": preprocess(images, rng), "label": labels}
