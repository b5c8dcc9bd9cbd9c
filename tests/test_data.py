"""Tests of the image pipelines (Fashion-MNIST, and TFDS with mock data)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ghn_jax.data import augment, fashion_mnist, pipeline

FASHION_DIR = fashion_mnist.DEFAULT_DATA_DIR
needs_fashion = pytest.mark.skipif(
  not os.path.isdir(FASHION_DIR),
  reason="dataset-fashion-mnist is not installed",
)


@needs_fashion
def test_fashion_mnist_shapes_and_padding():
  images, labels = fashion_mnist.load_fashion_mnist("test")
  assert images.shape == (10_000, 32, 32, 3)
  assert images.dtype == np.uint8
  assert labels.shape == (10_000,)
  assert set(np.unique(labels)) == set(range(10))
  # The 2-pixel border is padding, and the three channels are equal.
  assert images[:, :2].max() == 0
  assert images[:, :, -2:].max() == 0
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert images.max() == 255


@needs_fashion
def test_fashion_mnist_normalisation_constants():
  images, _ = fashion_mnist.load_fashion_mnist("train")
  scaled = images[..., 0].astype(np.float64) / 255.0
  assert abs(scaled.mean() - fashion_mnist.MEAN[0]) < 1e-3
  assert abs(scaled.std() - fashion_mnist.STD[0]) < 1e-3


def test_fashion_mnist_missing_dir_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install"):
    fashion_mnist.load_fashion_mnist("train", str(tmp_path))


def test_fashion_mnist_bad_split():
  with pytest.raises(ValueError, match="split"):
    fashion_mnist.load_fashion_mnist("validation")


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="mnist2"):
    pipeline.get_dataset_info("mnist2")


def _array_stream(num, batch_size, seed=0, train=True):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(num, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(num, dtype=np.int32)
  source = pipeline.ArraySource(images, labels)
  info = pipeline.get_dataset_info("cifar10")
  return pipeline.ImageBatchStream(source, info, batch_size, seed, train)


def test_stream_epoch_visits_each_example_once():
  stream = _array_stream(num=10, batch_size=3)
  assert stream.batches_per_epoch == 3
  labels = np.concatenate([next(stream)["label"] for _ in range(3)])
  assert len(set(labels.tolist())) == 9
  assert stream.get_state() == {"epoch": 1, "batch": 0}
  batch = next(stream)
  assert batch["image"].shape == (3, 32, 32, 3)
  assert batch["image"].dtype == np.float32


def test_stream_resume_gives_same_batches():
  stream = _array_stream(num=20, batch_size=4, seed=3)
  for _ in range(7):
    next(stream)
  state = stream.get_state()
  expected = [next(stream) for _ in range(5)]

  resumed = _array_stream(num=20, batch_size=4, seed=3)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])


def test_stream_seeds_differ():
  first = next(_array_stream(num=20, batch_size=4, seed=0))["label"]
  second = next(_array_stream(num=20, batch_size=4, seed=1))["label"]
  assert not np.array_equal(first, second)


def test_stream_rejects_batch_larger_than_dataset():
  with pytest.raises(ValueError, match="batch_size"):
    _array_stream(num=2, batch_size=4)


def test_random_crop_flip_keeps_content():
  image = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1) + 1
  rng = np.random.default_rng(0)
  out = augment.random_crop_flip(image, rng, padding=2)
  assert out.shape == image.shape
  # Every non-zero output pixel comes from the same image, maybe flipped.
  for i in range(2):
    values = out[i][out[i] > 0]
    assert np.isin(values, image[i]).all()


def test_random_crop_flip_zero_padding_is_identity_or_flip():
  image = np.random.default_rng(1).random((4, 6, 6, 3))
  out = augment.random_crop_flip(image, np.random.default_rng(0), padding=0)
  for i in range(4):
    same = np.array_equal(out[i], image[i])
    flipped = np.array_equal(out[i], image[i][:, ::-1])
    assert same or flipped


def test_normalize_per_channel():
  images = np.full((1, 2, 2, 3), 255, np.uint8)
  out = augment.normalize(images, (0.5, 0.0, 1.0), (0.5, 1.0, 2.0))
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 1.0, 0.0])


def test_cifar10_mock_stream():
  with tfds.testing.mock_data(num_examples=12):
    stream = pipeline.create_train_stream("cifar10", batch_size=4, seed=0)
    batch = next(stream)
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["label"].dtype == np.int32
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
  assert stream.batches_per_epoch == 3


def test_imagenet_mock_train_and_eval_crops():
  with tfds.testing.mock_data(num_examples=4):
    stream = pipeline.create_train_stream("imagenet2012", 2, seed=0)
    train_batch = next(stream)
    eval_batches = list(
      pipeline.iterate_eval_batches("imagenet2012", batch_size=3)
    )
  assert train_batch["image"].shape == (2, 224, 224, 3)
  assert [b["image"].shape[0] for b in eval_batches] == [3, 1]
  assert eval_batches[0]["image"].shape[1:] == (224, 224, 3)
  assert np.isfinite(eval_batches[0]["image"]).all()


def test_center_crop_small_image():
  image = np.zeros((17, 47, 3), np.uint8)
  assert augment.center_crop(image).shape == (224, 224, 3)


def test_tfds_missing_dataset_names_tf_extra(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"ghn_jax\[tf\]"):
    pipeline.load_tfds_source("cifar10", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("subdir", ["", "missing"])
def test_tfds_unprepared_dir_says_how(tmp_path, subdir):
  data_dir = str(tmp_path / subdir) if subdir else str(tmp_path)
  with pytest.raises(FileNotFoundError) as info:
    pipeline.load_source("cifar10", "test", data_dir)
  message = str(info.value)
  assert "'cifar10'" in message
  assert data_dir in message
  assert "tfds build cifar10" in message
  assert "download_and_prepare()" in message
  assert "--data-dir" in message


def test_tfds_default_dir_empty_splits(tmp_path, monkeypatch):
  # With no data_dir, TFDS reads its built-in metadata of cifar10 and fails
  # with "splits is empty" (a KeyError) unless the error is translated.
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError) as info:
    pipeline.load_source("cifar10", "test", None)
  assert isinstance(info.value.__cause__, KeyError)
  assert str(tmp_path) in str(info.value)
  assert "tfds build cifar10" in str(info.value)
