"""Pre-resized shards: a webdataset shard set rewritten with each sample's image made
smaller, every other member kept as is, so that training reads, decodes and resizes
fewer pixels (benchmarks/README.md, "Training input", has the gain).

  python -m tinyclip_jax.data.resize_shards --src='/data/laion/{00000..00999}.tar' \
      --out=/data/laion-256 --shorter_side=256 [--quality=95] [--processes=N]

This changes the training pixels (a second lossy encode, and the random crop is drawn
on the smaller image): a run or teacher cache on the output is a run on other data.
What it does, per sample (members sharing a key, grouped as the training reader
groups them):
- The image is the member the reader takes (KEY.jpg, .jpeg, .png or .webp, in that
  order). When its shorter side is above --shorter_side it is decoded by the one
  decoding rule (tinyclip_jax/data/decode.py: PIL's RGB pixels), resized by PIL's
  bicubic so that its shorter side is --shorter_side and its longer side
  round(longer · shorter_side / shorter) (Python's round), and written as KEY.jpg:
  PIL's JPEG encoder at --quality with its default 4:2:0 chroma subsampling.
- An image already that small, one that does not decode, or one with more than
  --max_image_pixels pixels (training skips those as huge_image; this keeps them
  skipped) is copied byte for byte, as is every other member (KEY.txt, KEY.json, ...),
  in the same order.
- A truncated or unreadable tar gives a shard of its complete samples and a warning.

Output shards keep their source file names, in --out. Nothing is overwritten: any
existing output name stops the tool before it writes (exit code 2), and each shard
is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import copy
import io
import json
import multiprocessing
import posixpath
import sys
import tarfile
import warnings

import tensorflow as tf
from PIL import Image

from tinyclip_jax import cli, paths
from tinyclip_jax.data import decode, shards

USAGE = ("python -m tinyclip_jax.data.resize_shards --src=PATTERN --out=DIR --shorter_side=N "
         "[--quality=95] [--max_image_pixels=50000000] [--processes=1]")
PARTIAL = ".partial"


def target_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
  """(width, height) with the shorter side `shorter_side`, the aspect kept."""
  short, long_ = min(width, height), max(width, height)
  other = max(1, round(long_ * shorter_side / short))
  return (shorter_side, other) if width <= height else (other, shorter_side)


def resize_image(data: bytes, shorter_side: int, quality: int, max_pixels: int) -> bytes | None:
  """The re-encoded smaller image, or None to keep `data` as is."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data), formats=decode.FORMATS) as im:
        width, height = im.size
      if min(width, height) <= shorter_side or width * height > max_pixels:
        return None
      rgb = decode.open_rgb(data)
  except Exception:  # noqa: BLE001 - PIL raises many types on garbage; the reader counts it
    return None
  small = rgb.resize(target_size(width, height, shorter_side), Image.BICUBIC)
  buf = io.BytesIO()
  small.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _key_and_ext(name: str) -> tuple[str, str]:
  folder, base = posixpath.split(name)
  stem, _, ext = base.partition(".")
  return posixpath.join(folder, stem), ext


def _write_sample(tar, members: list, args, stats: dict) -> None:
  """Writes one sample's members in order, the image member resized."""
  files = {_key_and_ext(i.name)[1].lower(): n for n, (i, _) in enumerate(members) if i.isfile()}
  pick = next((files[e] for e in shards.IMAGE_EXTS if e in files), None)
  stats["samples"] += 1
  for n, (info, data) in enumerate(members):
    if n == pick:
      stats["image_bytes_in"] += len(data)
      small = resize_image(data, args.shorter_side, args.quality, args.max_image_pixels)
      if small is not None:
        info, data = copy.copy(info), small
        key, ext = _key_and_ext(info.name)
        info.name = info.name if ext.lower() in ("jpg", "jpeg") else f"{key}.jpg"
        info.size = len(data)
        stats["resized"] += 1
      stats["image_bytes_out"] += len(data)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def rewrite_shard(src: str, dst: str, args) -> dict:
  """Writes the resized copy of one shard (via dst + PARTIAL, renamed when complete)."""
  stats = {"shard": src, "samples": 0, "resized": 0, "image_bytes_in": 0, "image_bytes_out": 0}
  tmp = dst + PARTIAL
  try:
    with tf.io.gfile.GFile(tmp, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
      key, members = None, []
      try:
        with tf.io.gfile.GFile(src, "rb") as f, tarfile.open(fileobj=f, mode="r|") as source:
          for info in source:
            name = _key_and_ext(info.name)[0]
            if info.isfile() and key is not None and name != key:  # complete: written first
              _write_sample(tar, members, args, stats)
              members = []
            key = name if info.isfile() else key
            members.append((info, source.extractfile(info).read() if info.isfile() else b""))
      except (tarfile.TarError, EOFError) as e:
        stats["truncated"] = f"{type(e).__name__}: {e}"
        print(f"warning: {src} is truncated or unreadable after sample {key}; its complete "
              "samples were written.", file=sys.stderr)
        members = []  # the sample being read, as the training reader drops it
      if members:
        _write_sample(tar, members, args, stats)
    tf.io.gfile.rename(tmp, dst, overwrite=False)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)
  return stats


def _plan(args) -> list[tuple[str, str]]:
  """(source, output) pairs; a ValueError names anything that would be overwritten."""
  sources = shards.resolve(args.src, "--src")
  not_tar = [s for s in sources if not s.endswith(".tar")]
  if not_tar:
    raise ValueError(f"--src matches {not_tar[0]}, which is not a webdataset .tar shard; "
                     "resize_shards rewrites tar shards only.")
  pairs = [(s, posixpath.join(args.out, posixpath.basename(s))) for s in sources]
  names = [posixpath.basename(s) for s in sources]
  twice = next((n for n in names if names.count(n) > 1), None)
  if twice:
    raise ValueError(f"--src has two shards named {twice}; their outputs would collide in "
                     f"{args.out}: resize each folder into its own --out.")
  taken = [d for _, d in pairs if tf.io.gfile.exists(d) or tf.io.gfile.exists(d + PARTIAL)]
  if taken:
    raise ValueError(f"{taken[0]} exists ({len(taken)} of the {len(pairs)} outputs do); "
                     "resize_shards never overwrites: give an empty --out or remove them.")
  return pairs


def _parser() -> cli.Parser:
  p = cli.Parser(prog="python -m tinyclip_jax.data.resize_shards", usage_line=USAGE,
                 description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--src", required=True, type=paths.resolve_patterns,
                 help="shard pattern: braces, globs, '::'-joined, local or gs://")
  p.add_argument("--out", required=True, type=paths.resolve, help="folder of the output shards")
  p.add_argument("--shorter_side", required=True, type=int, help="pixels; larger images shrink")
  p.add_argument("--quality", type=int, default=95, help="JPEG quality of resized images")
  p.add_argument("--max_image_pixels", type=int, default=50_000_000,
                 help="larger images are copied as is (training skips them: data.max_image_pixels)")
  p.add_argument("--processes", type=int, default=1, help="shards rewritten in parallel")
  return p


def run(argv: list[str]) -> dict:
  args = _parser().parse_args(argv)
  for flag in ("shorter_side", "max_image_pixels", "processes"):
    if getattr(args, flag) < 1:
      raise cli.UsageError(f"--{flag}={getattr(args, flag)} must be positive; usage: {USAGE}")
  if not 1 <= args.quality <= 100:
    raise cli.UsageError(f"--quality={args.quality} must be in 1..100; usage: {USAGE}")
  pairs = _plan(args)
  tf.io.gfile.makedirs(args.out)
  jobs = [(s, d, args) for s, d in pairs]
  if args.processes == 1:
    results = [rewrite_shard(*j) for j in jobs]
  else:  # spawn: TensorFlow is loaded here, and forking it can hang the children
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
      results = pool.starmap(rewrite_shard, jobs, chunksize=1)
  summary = {k: sum(r[k] for r in results)
             for k in ("samples", "resized", "image_bytes_in", "image_bytes_out")}
  summary.update(shards=len(results), out=args.out, shorter_side=args.shorter_side,
                 quality=args.quality, truncated=[r["shard"] for r in results if "truncated" in r])
  print(json.dumps(summary))
  return summary


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (0, or 2 for bad input)."""
  return cli.run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
