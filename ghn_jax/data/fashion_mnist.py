"""Fashion-MNIST read with numpy from IDX files, shaped like CIFAR-10.

The offline default dataset. The files are those of the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`). Each 28x28
grayscale image is zero-padded by 2 pixels on every side to 32x32 and its
single channel is replicated three times, so that networks built for
CIFAR-10 inputs (32x32x3) run on it unchanged.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
IMAGE_SIZE = 32
NUM_CHANNELS = 3
SOURCE_IMAGE_SIZE = 28

# Per-channel mean and standard deviation of the padded training images in
# [0, 1], computed once from the 60,000 training images (tests recompute them).
MEAN = (0.2190,) * NUM_CHANNELS
STD = (0.3318,) * NUM_CHANNELS

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_FILE_NAMES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = (
  "Install it with `sudo apt-get install dataset-fashion-mnist` (or "
  "`make install`), or pass the folder that holds the four IDX .gz files."
)


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Read one gzip-compressed IDX file into a uint8 array."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[0:4], "big")
  if magic != expected_magic:
    raise ValueError(
      f"{path} is not an IDX file of the expected kind: magic number "
      f"{magic}, expected {expected_magic}. Re-install the dataset."
    )
  ndim = data[3]
  dims = [
    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
  ]
  offset = 4 + 4 * ndim
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(
  split: str, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Load one split of Fashion-MNIST as 32x32x3 uint8 images.

  Args:
    split: "train" (60,000 images) or "test" (10,000 images).
    data_dir: folder with the IDX .gz files; default `DEFAULT_DATA_DIR`.

  Returns:
    images: uint8 (N, 32, 32, 3), zero-padded and channel-replicated.
    labels: int32 (N,), class indices in [0, 10).

  Raises:
    ValueError: if `split` is unknown.
    FileNotFoundError: if the dataset files are missing.
  """
  if split not in _FILE_NAMES:
    raise ValueError(
      f"Unknown Fashion-MNIST split {split!r}: use one of "
      f"{sorted(_FILE_NAMES)}."
    )
  data_dir = data_dir or DEFAULT_DATA_DIR
  image_file, label_file = (
    os.path.join(data_dir, name) for name in _FILE_NAMES[split]
  )
  for path in (image_file, label_file):
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"Fashion-MNIST file not found: {path}. {_INSTALL_HINT}"
      )

  images = _read_idx(image_file, _IDX_IMAGES_MAGIC)
  labels = _read_idx(label_file, _IDX_LABELS_MAGIC).astype(np.int32)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"{image_file} contains {images.shape[0]} images but {label_file} "
      f"holds {labels.shape[0]} labels. Re-install the dataset."
    )

  pad = (IMAGE_SIZE - SOURCE_IMAGE_SIZE) // 2
  images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
  images = np.repeat(images[..., None], NUM_CHANNELS, axis=-1)
  return images, labels
