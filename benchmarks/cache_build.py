"""What building a per-sample teacher cache costs against the teacher forward alone.

  python -m benchmarks.cache_build --teacher=ViT-B-16 --samples=32 --augmentations=2

Writes `samples` generated pairs as webdataset shards (JPEG, `--source` px), builds a
per-sample cache of K crops each (`cache_teacher.build_samples`: read, decode, crop,
resize, tokenize, the teacher's image and text towers, write), and times the teacher's
image tower alone on the same number of random images in batches of the same size.
Prints JSON lines: the build's images/s (K crops per sample count as K images), the
forward's, and their ratio (1.0 = the build costs exactly one image forward per crop).
The teacher has random weights (the cost does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import jax
import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.cache_build")
  p.add_argument("--teacher", default="ViT-B-16")
  p.add_argument("--student", default="TinyCLIP-ViT-39M-16-Text-19M")
  p.add_argument("--samples", type=int, default=32)
  p.add_argument("--augmentations", type=int, default=2)
  p.add_argument("--source", type=int, default=256, help="stored image size (px)")
  p.add_argument("--batch", type=int, default=32, help="images per teacher forward")
  p.add_argument("--precision", default="auto")
  a = p.parse_args(argv)

  from tinyclip_jax import cache_teacher  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import make_shards  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP, init_params, l2_normalize, zoo  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models.precision import policy_for  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train.defaults import base_config  # pylint: disable=import-outside-toplevel

  root = tempfile.mkdtemp(prefix="cache_build_")
  make_shards.write_shards(f"{root}/shards", 2, a.samples // 2, image_size=a.source)
  c = base_config()
  c.teacher.model, c.student.model = a.teacher, a.student
  c.data.kind, c.data.train = "webdataset", f"{root}/shards/*.tar"
  c.data.crop_scale_min = 0.35
  c.precision, c.batch_size = a.precision, 8
  manifest = cache_teacher.build_samples(c, f"{root}/cache", a.augmentations, batch=a.batch)
  build = manifest["build"]

  cfg = zoo.get(a.teacher)
  policy = policy_for(a.precision, jax.devices()[0].platform)
  model = CLIP(cfg, **policy.teacher_kw)
  params = init_params(cfg, jax.random.key(0))
  image = jax.jit(lambda p, x: l2_normalize(model.apply({"params": p}, x,
                                                        method=CLIP.encode_image)))
  size = cfg.vision.image_size
  x = np.random.default_rng(0).standard_normal((a.batch, size, size, 3), np.float32)
  image(params, x).block_until_ready()  # compile
  n = build["images"]
  t0 = time.perf_counter()
  for _ in range(-(-n // a.batch)):
    image(params, x).block_until_ready()
  forward = -(-n // a.batch) * a.batch / (time.perf_counter() - t0)
  common = {"teacher": a.teacher, "samples": a.samples, "augmentations": a.augmentations,
            "batch": a.batch, "device": jax.devices()[0].device_kind}
  print(json.dumps(dict(common, what="cache_build", images=n, seconds=round(build["seconds"], 2),
                        images_per_s=round(build["images_per_s"], 2))))
  print(json.dumps(dict(common, what="image_forward", images_per_s=round(forward, 2))))
  print(json.dumps(dict(common, what="ratio", build_over_forward=round(
      build["images_per_s"] / forward, 3))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
