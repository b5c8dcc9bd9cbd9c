"""Image augmentations and normalisation in numpy, seeded explicitly."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Standard ImageNet evaluation: resize the shorter side, then center-crop.
IMAGENET_RESIZE = 256
IMAGENET_CROP = 224
# Inception-style random-resized-crop ranges (area fraction, aspect ratio).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10


def random_crop_flip(
  images: np.ndarray, rng: np.random.Generator, padding: int = 4
) -> np.ndarray:
  """Randomly crop after zero padding, and flip horizontally with p=0.5.

  Args:
    images: (B, H, W, C) batch of images of any dtype.
    rng: generator that draws the crop offsets and flips.
    padding: zero padding added on each side before cropping back to HxW.

  Returns:
    The augmented batch, same shape and dtype as `images`.
  """
  batch, height, width, _ = images.shape
  padded = np.pad(
    images, ((0, 0), (padding, padding), (padding, padding), (0, 0))
  )
  offsets_y = rng.integers(0, 2 * padding + 1, size=batch)
  offsets_x = rng.integers(0, 2 * padding + 1, size=batch)
  flips = rng.random(batch) < 0.5
  out = np.empty_like(images)
  for i in range(batch):
    crop = padded[
      i,
      offsets_y[i] : offsets_y[i] + height,
      offsets_x[i] : offsets_x[i] + width,
    ]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def random_resized_crop(
  image: np.ndarray, rng: np.random.Generator, size: int = IMAGENET_CROP
) -> np.ndarray:
  """Crop a random area and aspect ratio, resize to `size`, maybe flip."""
  height, width = image.shape[:2]
  area = height * width
  box = None
  for _ in range(_CROP_ATTEMPTS):
    target_area = area * rng.uniform(*CROP_SCALE)
    log_ratio = rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    ratio = math.exp(log_ratio)
    crop_w = int(round(math.sqrt(target_area * ratio)))
    crop_h = int(round(math.sqrt(target_area / ratio)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      box = (left, top, left + crop_w, top + crop_h)
      break
  if box is None:
    # Fall back to the largest central square, as torchvision does.
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    box = (left, top, left + side, top + side)

  resized = Image.fromarray(image).resize(
    (size, size), Image.Resampling.BILINEAR, box=box
  )
  out = np.asarray(resized)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def center_crop(
  image: np.ndarray,
  size: int = IMAGENET_CROP,
  resize: int = IMAGENET_RESIZE,
) -> np.ndarray:
  """Resize the shorter side to `resize`, then crop the central square."""
  height, width = image.shape[:2]
  scale = resize / min(height, width)
  new_h = max(size, int(round(height * scale)))
  new_w = max(size, int(round(width * scale)))
  resized = np.asarray(
    Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
  )
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top : top + size, left : left + size]


def normalize(
  images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
  """Scale uint8 images to [0, 1] and standardise each channel (float32)."""
  images = images.astype(np.float32) / 255.0
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images - mean) / std
