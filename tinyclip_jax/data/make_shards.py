"""Writes generated image–caption shard sets in the layouts img2dataset produces
(webdataset tars: KEY.jpg + KEY.txt + KEY.json; TFRecords: tf.train.Example with
key/jpg/txt), optionally with bad samples of every kind. Tests and the input
benchmark build their data with it; nothing is downloaded.

python -m tinyclip_jax.data.make_shards --out=/tmp/shards --shards=4 --per_shard=256
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image

from tinyclip_jax.data import synthetic

# Bad samples a shard set can hold: name → what the reader must report.
BAD = ("corrupt_image", "empty_caption", "missing_caption", "bad_utf8", "tiny_image", "huge_image")


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _huge_png() -> bytes:
  """A 9000 × 9000 PNG of a few kB: its header says 81 M pixels."""
  buf = io.BytesIO()
  Image.new("L", (9000, 9000)).save(buf, "PNG")
  return buf.getvalue()


def samples(num: int, image_size: int, seed: int, start: int = 0, bad: dict | None = None):
  """(key, {ext: bytes}) of generated pairs; `bad` maps an index to a BAD kind."""
  spec = synthetic.SyntheticSpec(image_size=image_size, seed=seed)
  bad = bad or {}
  huge = None
  for i in range(start, start + num):
    image, caption, attrs = synthetic.make_example(spec, "train", i)
    key = f"{i:09d}"
    parts = {
        "jpg": jpeg(image),
        "txt": caption.encode(),
        "json": json.dumps({
            "key": key,
            "caption": caption
        }).encode()
    }
    kind = bad.get(i)
    if kind == "corrupt_image":
      parts["jpg"] = parts["jpg"][:len(parts["jpg"]) // 2]  # header fine, data cut
    elif kind == "empty_caption":
      parts["txt"] = b"  \n"
    elif kind == "missing_caption":  # neither KEY.txt nor a caption in KEY.json
      del parts["txt"]
      parts["json"] = json.dumps({"key": key}).encode()
    elif kind == "bad_utf8":
      parts["txt"] = caption.encode() + b" \xff\xfe"
    elif kind == "tiny_image":
      parts["jpg"] = jpeg(image[:4, :4])
    elif kind == "huge_image":
      huge = huge or _huge_png()
      parts = {"png": huge, "txt": parts["txt"]}
    elif kind is not None:
      raise ValueError(f"bad sample kind {kind!r} is unknown; use one of {BAD}.")
    yield key, parts


def write_tar(path: str, items) -> list[str]:
  keys = []
  with tarfile.open(path, "w") as tar:
    for key, parts in items:
      keys.append(key)
      for ext, data in parts.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
  return keys


def write_tfrecord(path: str, items) -> list[str]:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  keys = []
  with tf.io.TFRecordWriter(path) as w:
    for key, parts in items:
      keys.append(key)
      feats = {"key": key.encode(), **parts}
      ex = tf.train.Example(
          features=tf.train.Features(feature={
              k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
              for k, v in feats.items()
          }))
      w.write(ex.SerializeToString())
  return keys


def write_shards(out: str,
                 num_shards: int,
                 per_shard: int,
                 image_size: int = 32,
                 seed: int = 0,
                 bad: dict | None = None,
                 fmt: str = "tar") -> dict[str, list]:
  """{shard path: sample keys} of `num_shards` files named 00000.tar, ... in `out`."""
  os.makedirs(out, exist_ok=True)
  write = {"tar": write_tar, "tfrecord": write_tfrecord}[fmt]
  result = {}
  for s in range(num_shards):
    path = os.path.join(out, f"{s:05d}.{fmt}")
    result[path] = write(path, samples(per_shard, image_size, seed, s * per_shard, bad))
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tinyclip_jax.data.make_shards")
  p.add_argument("--out", required=True)
  p.add_argument("--shards", type=int, default=4)
  p.add_argument("--per_shard", type=int, default=256)
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--format", choices=("tar", "tfrecord"), default="tar")
  a = p.parse_args(argv)
  write_shards(a.out, a.shards, a.per_shard, a.image_size, fmt=a.format)
  print(json.dumps({"out": a.out, "shards": a.shards, "per_shard": a.per_shard}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
