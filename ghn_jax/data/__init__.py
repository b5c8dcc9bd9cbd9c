"""Image data for meta-training and evaluation."""

from ghn_jax.data.fashion_mnist import load_fashion_mnist
from ghn_jax.data.pipeline import (
  DATASETS,
  ArraySource,
  DatasetInfo,
  ImageBatchStream,
  create_train_stream,
  get_dataset_info,
  iterate_eval_batches,
  load_source,
  load_tfds_source,
)

__all__ = [
  "DATASETS",
  "ArraySource",
  "DatasetInfo",
  "ImageBatchStream",
  "create_train_stream",
  "get_dataset_info",
  "iterate_eval_batches",
  "load_fashion_mnist",
  "load_source",
  "load_tfds_source",
]
