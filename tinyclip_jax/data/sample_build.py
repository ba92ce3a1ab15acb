"""The crops and captions a per-sample teacher cache embeds (data/sample_cache.py),
shard by shard, in the shard's record order.

Each usable record is decoded once (or once per crop with data.jpeg_scale > 1, whose
decoding depends on the crop) and cut into its K key-derived crops by the same
functions training uses (augment.decode_for_crop, crop_box, crop), and its caption is
repaired as training repairs it (sharded.repair_caption), so training replays the
very pixels and tokens the teacher saw. Records run through a thread pool a chunk at
a time (TensorFlow's decoders and PIL's resize release the GIL); a shard is never
held in memory whole.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from concurrent import futures
from typing import Iterator

import numpy as np
import tensorflow as tf

from tinyclip_jax.data import augment, sample_cache, shards


@dataclasses.dataclass
class Row:
  key_hash: int
  ok: bool
  crops: np.ndarray | None   # (K, S, S, 3) normalized float32
  boxes: np.ndarray          # (K, 4) int32, in the full-size image
  caption: str


class Crops:
  """Callable record → Row for one data config, K and image size."""

  def __init__(self, data_cfg, k: int, image_size: int):
    self.cfg, self.k, self.size = data_cfg, int(k), int(image_size)
    self.jpeg_scale = int(data_cfg.get("jpeg_scale", 1))
    self.scale = (float(data_cfg.crop_scale_min), float(data_cfg.crop_scale_max))
    self.ratio = (float(data_cfg.crop_ratio_min), float(data_cfg.crop_ratio_max))
    seed = int(data_cfg.get("augment_seed", 0))

    @tf.function(input_signature=[tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int64)])
    def crops(encoded, khash):
      draws = [lambda hh, ww, j=j: augment.crop_box(augment.key_seed(seed, j, khash), hh, ww,
                                                    self.scale, self.ratio)
               for j in range(self.k)]
      if self.jpeg_scale == 1:  # one decode serves every crop
        pixels, _, h, w = augment.decode_for_crop(encoded, draws[0], self.size, 1)
        boxes = [draw(h, w) for draw in draws]
        images = [augment.crop(pixels, box, self.size) for box in boxes]
      else:  # the DCT scale of the decode depends on the crop
        images, boxes = [], []
        for draw in draws:
          pixels, box, h, w = augment.decode_for_crop(encoded, draw, self.size, self.jpeg_scale)
          images.append(augment.crop(pixels, box, self.size))
          boxes.append(draw(h, w))  # the full-size box (the same draw)
      return tf.stack(images), tf.stack(boxes), h, w

    self._crops = crops

  def __call__(self, record) -> Row | None:
    """None for a record training never looks up (a reader's bad-sample marker)."""
    key, image, caption, reason = record
    if reason:
      return None
    khash = sample_cache.key_hash(key)
    fixed, _, reason = shards.repair_caption(tf.constant(caption), tf.constant(0, tf.int32))
    text = fixed.numpy().decode("utf-8")
    blank = Row(khash, False, None, np.zeros((self.k, 4), np.int32), "")
    if int(reason):
      return blank
    try:
      images, boxes, h, w = self._crops(tf.constant(image), tf.constant(khash, tf.int64))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):  # corrupt image
      return blank
    h, w = int(h), int(w)
    if min(h, w) < int(self.cfg.min_image_size) or h * w > int(self.cfg.max_image_pixels):
      return blank
    return Row(khash, True, images.numpy(), boxes.numpy(), text)


def shard_rows(shard: str, data_cfg, k: int, image_size: int, chunk: int = 64,
               crops: Crops | None = None) -> Iterator[list[Row]]:
  """Lists of up to `chunk` rows of a shard's lookup-able records, in record order."""
  crops = crops or Crops(data_cfg, k, image_size)
  records = shards.READERS[data_cfg.kind](shard, int(data_cfg.min_image_size),
                                          int(data_cfg.max_image_pixels),
                                          str(data_cfg.caption_key))
  workers = max(1, min(16, os.cpu_count() or 1))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    while True:
      part = list(itertools.islice(records, chunk))
      if not part:
        return
      rows = [r for r in pool.map(crops, part) if r is not None]
      if rows:
        yield rows
