"""Writes generated image–caption shard sets in the layouts img2dataset produces
(webdataset tars: KEY.jpg + KEY.txt + KEY.json; TFRecords: tf.train.Example with
key/jpg/txt), optionally with bad samples of every kind. Tests and the input
benchmark build their data with it; nothing is downloaded.

python -m tinyclip_jax.data.make_shards --out=/tmp/shards --shards=4 --per_shard=256
"""
from __future__ import annotations

import argparse
import functools
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


@functools.lru_cache(maxsize=1)
def _huge_png() -> bytes:
  """A 9000 × 9000 PNG of a few kB: its header says 81 M pixels."""
  buf = io.BytesIO()
  Image.new("L", (9000, 9000)).save(buf, "PNG")
  return buf.getvalue()


def png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "PNG")
  return buf.getvalue()


def samples(num: int, image_size: int, seed: int, start: int = 0, bad: dict | None = None,
            spec: synthetic.SyntheticSpec | None = None, lossless: bool = False):
  """(key, {ext: bytes}) of generated pairs; `bad` maps an index to a BAD kind; `spec`:
  the generator's options (default: its defaults at image_size and seed); lossless:
  PNG instead of JPEG (the demo's pixels stay the generator's)."""
  spec = spec or synthetic.SyntheticSpec(image_size=image_size, seed=seed)
  bad = bad or {}
  batch = 256  # drawn a batch at a time: one call per image is several times slower
  for b0 in range(start, start + num, batch):
    drawn = synthetic.make_batch(spec, "train", b0, min(batch, start + num - b0))
    for j, (image, caption) in enumerate(zip(drawn["images"], drawn["captions"])):
      yield _sample(b0 + j, image, caption, bad.get(b0 + j), lossless)


def _sample(i: int, image: np.ndarray, caption: str, kind: str | None, lossless: bool):
  key = f"{i:09d}"
  ext = "png" if lossless else "jpg"
  parts = {ext: (png if lossless else jpeg)(image), "txt": caption.encode(),
           "json": json.dumps({"key": key, "caption": caption}).encode()}
  if kind == "corrupt_image":
    parts[ext] = parts[ext][:len(parts[ext]) // 2]  # header fine, data cut
  elif kind == "empty_caption":
    parts["txt"] = b"  \n"
  elif kind == "missing_caption":  # neither KEY.txt nor a caption in KEY.json
    del parts["txt"]
    parts["json"] = json.dumps({"key": key}).encode()
  elif kind == "bad_utf8":
    parts["txt"] = caption.encode() + b" \xff\xfe"
  elif kind == "tiny_image":
    parts[ext] = jpeg(image[:4, :4])
  elif kind == "huge_image":
    parts = {"png": _huge_png(), "txt": parts["txt"]}
  elif kind is not None:
    raise ValueError(f"bad sample kind {kind!r} is unknown; use one of {BAD}.")
  return key, parts


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
                 fmt: str = "tar",
                 spec: synthetic.SyntheticSpec | None = None,
                 lossless: bool = False) -> dict[str, list]:
  """{shard path: sample keys} of `num_shards` files named 00000.tar, ... in `out`
  (`spec`, `lossless`: see `samples`)."""
  os.makedirs(out, exist_ok=True)
  write = {"tar": write_tar, "tfrecord": write_tfrecord}[fmt]
  result = {}
  for s in range(num_shards):
    path = os.path.join(out, f"{s:05d}.{fmt}")
    result[path] = write(path, samples(per_shard, image_size, seed, s * per_shard, bad, spec,
                                       lossless))
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
