"""Where the training input's CPU time goes, per image: each stage of `ShardedPairs` timed
alone on the same shards (CPU time of this process, best of --repeats, one tf.data
thread, batches of 64), cumulatively from the reader to the whole per-image map, then
the whole pipeline. A stage's cost is its row minus the row above it.

python -m benchmarks.input_stages --data=FOLDER_OF_TARS [--image=224] [--repeats=3]

One JSON line per stage: {"stage", "ms_per_image"}. The stages use only the public
pieces (shards.read_tar, decode.decode_tf, augment.crop_box / resize / normalize,
tokenizer.tokenize, ShardedPairs), so the same script times an older checkout. The
whole pipeline's row also holds what no row isolates (shuffle, counting scans, batching of
the records' other fields, prefetch).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time


def _best(fn, n: int, repeats: int) -> float:
  """Fewest CPU milliseconds per image over `repeats` runs of fn (n images each)."""
  fn()  # warm-up: tracing, caches
  best = float("inf")
  for _ in range(repeats):
    c0 = time.process_time()
    fn()
    best = min(best, time.process_time() - c0)
  return 1e3 * best / n


def stages(args):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import tokenizer  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import augment, decode, sharded, shards  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import defaults  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(args.data, "*.tar")))
  records = [r for f in files for r in shards.read_tar(f, 16, 50_000_000)]
  images, n = [r[1] for r in records], len(records)
  cfg = defaults.base_config().data
  cfg.update(kind="webdataset", train=os.path.join(args.data, "*.tar"), threads=1,
             num_parallel_calls=1, shuffle_buffer=1000, shards_per_window=len(files))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1

  def drain(ds):
    for _ in ds.batch(64).with_options(options):
      pass

  encoded = tf.constant(images)

  def per_image(fn):
    return lambda: drain(tf.data.Dataset.from_tensor_slices(encoded).map(fn))

  seed = tf.constant([1, 2], tf.int64)

  def crop(x):
    image = decode.decode_tf(x)
    shape = tf.shape(image)
    top, left, ch, cw = tf.unstack(augment.crop_box(seed, shape[0], shape[1]))
    return image[top:top + ch, left:left + cw]

  size = args.image
  src = sharded.ShardedPairs(cfg, size, 77, 64)
  captions = [r[2].decode() for r in records]
  rows = [
      ("read_tar in Python (with the PIL header check)",
       lambda: [r for f in files for r in shards.read_tar(f, 16, 50_000_000)]),
      ("PIL header check alone", lambda: [shards.check_header(b, 16, 50_000_000) for b in images]),
      ("reader in tf.data (interleaved shards)", lambda: drain(
          tf.data.Dataset.from_tensor_slices(files).interleave(
              src._read_unit, cycle_length=len(files), num_parallel_calls=len(files),  # pylint: disable=protected-access
              deterministic=True))),
      ("tf.data over the image bytes, nothing done", per_image(lambda x: tf.strings.length(x))),
      ("+ decode (decode_tf)", per_image(lambda x: decode.decode_tf(x)[0, 0, 0])),
      ("+ crop box and crop", per_image(lambda x: crop(x)[0, 0, 0])),
      ("+ PIL bicubic resize", per_image(lambda x: augment.resize(crop(x), size)[0, 0, 0])),
      ("+ float32 image out (cast, batched)",
       per_image(lambda x: tf.cast(augment.resize(crop(x), size), tf.float32))),
      ("+ normalize (the whole per-image map)",
       per_image(lambda x: augment.normalize(tf.cast(augment.resize(crop(x), size), tf.float32)))),
      ("tokenize (batches of 64)",
       lambda: [tokenizer.tokenize(captions[i:i + 64], 77) for i in range(0, n, 64)]),
  ]
  for name, fn in rows:
    yield name, _best(fn, n, args.repeats)
  pairs = sharded.ShardedPairs(cfg, size, 77, 64)
  try:
    for _ in range(3):  # start, tracing and the shuffle buffer's fill: not timed
      next(pairs)
    best = float("inf")
    for _ in range(args.repeats):
      c0 = time.process_time()
      for _ in range(4):
        next(pairs)
      best = min(best, time.process_time() - c0)
  finally:
    pairs.close()
  yield "whole pipeline (ShardedPairs, after its start)", 1e3 * best / (4 * 64)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.input_stages")
  p.add_argument("--data", required=True, help="a folder of NNNNN.tar shards")
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  for name, ms in stages(args):
    print(json.dumps({"stage": name, "ms_per_image": round(ms, 3)}), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
