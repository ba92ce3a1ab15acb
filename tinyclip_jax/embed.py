"""Embed images and captions with a model checkpoint.

  python -m tinyclip_jax.embed --checkpoint=DIR [--images=FOLDER|FILE.npy] \
      [--texts=FILE] --output=OUT.npz [--batch_size=N]

--images: a folder of image files (sorted by name; png/jpg/jpeg/webp/bmp),
preprocessed as CLIP's eval transform at the model's image size, or a .npy uint8
NHWC array already at that size. --texts: one caption per line (lines end at a
line feed only; a trailing carriage return is dropped). The npz holds L2-normalized
float32 `image_embeds` / `text_embeds`, the int32 `tokens` and the `image_files`
names (for whichever inputs were given). Bad input prints one sentence to stderr and
exits with code 2.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Callable

import numpy as np

from tinyclip_jax import cli, paths
from tinyclip_jax.cli import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


USAGE = ("python -m tinyclip_jax.embed --checkpoint=DIR [--images=PATH] [--texts=FILE] "
         "--output=OUT.npz [--batch_size=N]")


def _parser() -> argparse.ArgumentParser:
  p = cli.Parser(prog="python -m tinyclip_jax.embed", usage_line=USAGE,
                 description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, type=paths.resolve,
                 help="a tinyclip_jax.model_io folder")
  p.add_argument("--images", type=paths.resolve,
                 help="folder of image files, or a uint8 NHWC .npy array")
  p.add_argument("--texts", type=paths.resolve, help="text file, one caption per line")
  p.add_argument("--output", required=True, type=paths.resolve, help="the .npz to write")
  p.add_argument("--batch_size", type=int, default=64)
  return p


# --------------------------------------------------------------------------- inputs


def list_images(folder: str) -> list[str]:
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)
                 and os.path.isfile(os.path.join(folder, n)))
  if not names:
    raise UsageError(f"{folder} has no image files ({', '.join(IMAGE_SUFFIXES)}).")
  return names


def _load_one(path: str, size: int) -> np.ndarray:
  from PIL import UnidentifiedImageError
  from tinyclip_jax.preprocess import load_image
  try:
    return load_image(path, size)
  except (UnidentifiedImageError, OSError) as e:
    raise UsageError(f"{path} is not a readable image ({e}).") from None


def open_image_array(path: str, size: int) -> np.ndarray:
  """The .npy images, memory-mapped (batches are read and normalized one at a time)."""
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise UsageError(f"{path} is not a readable .npy array ({e}).") from None
  if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or not len(arr):
    raise UsageError(f"{path} holds {arr.dtype} of shape {arr.shape}, but uint8 images of "
                     f"shape (N >= 1, {size}, {size}, 3) are expected for this model.")
  return arr


def image_source(path: str, size: int) -> tuple[list[str], Callable[[int, int], np.ndarray]]:
  """(names, load(start, stop) → normalized NHWC float32 images); images are read lazily,
  so a large folder never has to fit in memory at once."""
  from tinyclip_jax.preprocess import normalize
  if os.path.isdir(path):
    names = list_images(path)
    return names, lambda a, b: np.stack([_load_one(os.path.join(path, n), size)
                                         for n in names[a:b]])
  if not os.path.isfile(path):
    raise UsageError(f"{path} does not exist; give a folder of images or a .npy array.")
  if not path.endswith(".npy"):
    raise UsageError(f"{path} is a file but not a .npy array; give a folder of images or a "
                     ".npy array of uint8 NHWC images.")
  arr = open_image_array(path, size)
  base = os.path.basename(path)
  return [f"{base}[{i}]" for i in range(len(arr))], lambda a, b: normalize(np.asarray(arr[a:b]))


def load_texts(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise UsageError(f"{path} is not a file; give a text file with one caption per line.")
  from tinyclip_jax.data.captions import read_lines
  lines = read_lines(path)  # split at "\n" only: a caption may hold U+2028, \f, …
  if not lines:
    raise UsageError(f"{path} is empty; give one caption per line.")
  return lines


# --------------------------------------------------------------------------- model


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  from tinyclip_jax import storage
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  storage.write_bytes(path, buf.getvalue())  # atomic, local or gs://


# --------------------------------------------------------------------------- main


def run(argv: list[str]) -> dict[str, np.ndarray]:
  args = _parser().parse_args(argv)
  from tinyclip_jax import storage
  # gs:// images (a folder or .npy) and texts are fetched to a temporary folder first.
  with storage.local_copy(args.images or "") as images, \
      storage.local_copy(args.texts or "") as texts:
    args.images = images if args.images is not None else None
    args.texts = texts if args.texts is not None else None
    return _embed(args)


def _embed(args) -> dict[str, np.ndarray]:
  if args.images is None and args.texts is None:
    raise UsageError("give --images, --texts or both; there is nothing to embed.")
  if args.batch_size < 1:
    raise UsageError(f"--batch_size must be at least 1, not {args.batch_size}.")
  from tinyclip_jax.model_io import load_model
  from tinyclip_jax.tokenizer import tokenize
  params, config = load_model(args.checkpoint)
  # Check every input before computing anything, so bad input fails fast.
  names = load = tokens = None
  if args.images is not None:
    names, load = image_source(args.images, config.vision.image_size)
  if args.texts is not None:
    tokens = tokenize(load_texts(args.texts), context_length=config.text.context_length)
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.eval.encode import batched, encoders  # pylint: disable=import-outside-toplevel
  image_fn, text_fn = encoders(config, jax.device_put(params))
  out = {}
  if names is not None:
    out["image_embeds"] = batched(image_fn, len(names), load, args.batch_size)
    out["image_files"] = np.asarray(names, dtype=str)
  if tokens is not None:
    out["text_embeds"] = batched(text_fn, len(tokens), lambda a, b: tokens[a:b], args.batch_size)
    out["tokens"] = tokens.astype(np.int32)
  out = {k: v.astype(np.float32) if k.endswith("_embeds") else v for k, v in out.items()}
  write_npz(args.output, out)
  print(f"wrote {', '.join(f'{k} {v.shape}' for k, v in out.items())} to {args.output}")
  return out


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (0, or 2 for bad input)."""
  return cli.run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
