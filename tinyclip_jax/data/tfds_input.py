"""TFDS datasets as sources: a prepared builder found by name and data_dir (never
downloaded here), its split's files as shard units, and a record reader that maps
an example to the pipeline's raw record (key, encoded image, captions, reason).

Images are read undecoded (`SkipDecoding`) so training and evaluation decode them
the same way as webdataset shards. The record holds all of an image's captions
(coco_captions has ~5) as a string vector, never joined into one string (no
separator character is safe: a caption may hold any); the training pipeline picks
one per sample and epoch.
"""
from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from tinyclip_jax.data.shards import CODE, DataError


def builder(name: str, data_dir: str, what: str = "data.tfds_name"):
  """A prepared TFDS builder, or a DataError naming what is missing and where."""
  if not name:
    raise DataError(f"{what} is empty; name a TFDS dataset, e.g. 'coco_captions'.")
  try:
    b = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"{what} {name!r} is not a TFDS dataset name; check the spelling "
                    "(tfds.list_builders() lists them).") from e
  if not b.is_prepared():
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise DataError(f"TFDS dataset {name!r} is not prepared in {where} (looked in "
                    f"{b.data_dir}); build it there with `tfds build {name} "
                    f"--data_dir={where}` or set the data_dir that holds it.")
  return b


def split_files(b, split: str) -> list[str]:
  if split not in b.info.splits:
    raise DataError(f"TFDS dataset {b.name!r} has no split {split!r}; it has "
                    f"{sorted(b.info.splits)}.")
  files = sorted(str(p) for p in b.info.splits[split].filepaths)
  if b.info.file_format and b.info.file_format.value != "tfrecord":
    raise DataError(f"TFDS dataset {b.name!r} is stored as {b.info.file_format.value}; "
                    "only tfrecord TFDS datasets are read here.")
  return files


def _field(example, path: str):
  for part in path.split("/"):
    if part not in example:
      return None
    example = example[part]
  return example


def record_reader(b, image_key: str, text_key: str):
  """(file path tensor) → dataset of raw records (key, image bytes, captions, reason);
  captions is a string vector, empty when the example has none."""
  decoders = {image_key.split("/")[0]: tfds.decode.SkipDecoding()}
  features = b.info.features

  def parse(path, i, serialized):
    ex = features.deserialize_example(serialized, decoders=decoders)
    image = _field(ex, image_key)
    text = _field(ex, text_key)
    if image is None or text is None:
      raise DataError(f"TFDS dataset {b.name!r} has no feature {image_key!r} or "
                      f"{text_key!r}; set data.image_key / data.text_key to its image and "
                      "caption features.")
    text = tf.reshape(text, [-1])
    reason = tf.where(tf.size(text) > 0, 0, CODE["missing_caption"])
    key = tf.strings.format("{}:{}", [tf.strings.split(path, "/")[-1], i])
    return key, image, text, tf.cast(reason, tf.int32)

  def read(path):
    return tf.data.TFRecordDataset(path).enumerate().map(lambda i, s: parse(path, i, s))

  return read


def eval_examples(name: str,
                  split: str,
                  data_dir: str,
                  fields: dict[str, str],
                  max_examples: int = 0):
  """Undecoded examples of an evaluation split in order: dicts of numpy values named
  by `fields` ({out_name: feature path}); images stay encoded bytes."""
  b = builder(name, data_dir, "eval task")
  if split not in b.info.splits:
    raise DataError(f"TFDS dataset {name!r} has no split {split!r}; it has "
                    f"{sorted(b.info.splits)}.")
  image_feature = [p for p in fields.values() if p.split("/")[0] == "image"]
  decoders = {"image": tfds.decode.SkipDecoding()} if image_feature else None
  ds = b.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  if max_examples:
    ds = ds.take(max_examples)
  ds = ds.map(lambda ex: {k: _field(ex, p) for k, p in fields.items()})
  return _closing(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()), b


def _closing(iterator):
  """Yields from a tf.data iterator and deletes it when done or closed, not at
  interpreter shutdown (see sharded.ShardedPairs.close)."""
  try:
    yield from iterator
  finally:
    del iterator
