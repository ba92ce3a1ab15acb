"""CLIP's evaluation preprocessing in numpy and PIL (no torch, no TF).

Matches OpenAI's `Resize(size, BICUBIC) → CenterCrop(size) → ToTensor → Normalize`
as torchvision computes it, except that images are converted to RGB first (as
Hugging Face's CLIPImageProcessor does): resizing palette images in their own
mode would fall back to nearest-neighbour. Files are decoded, and PIL images
converted, by the one rule training uses too (tinyclip_jax.data.decode). Outputs
are HWC / NHWC float32.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

# Pillow is imported where images are read, not with the module: the train step alone (the
# input pipeline's checks, benchmarks/gpu_check.py) runs on images without it.
if TYPE_CHECKING:
  from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(CLIP_MEAN, np.float32)
_STD = np.asarray(CLIP_STD, np.float32)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) with the shorter side = size, as torchvision's Resize(int):
  the longer side is int(size * long / short), truncated."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of torchvision's CenterCrop; round() is Python's
  round-half-to-even, as in torchvision."""
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return left, top, left + size, top + size


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
  """RGB image of size × size: shorter side resized to `size` (bicubic), center crop."""
  from PIL import Image  # pylint: disable=import-outside-toplevel,redefined-outer-name
  image = image.convert("RGB")
  new_size = resized_size(image.width, image.height, size)
  if new_size != image.size:  # torchvision returns the image unchanged in that case
    image = image.resize(new_size, Image.BICUBIC)
  return image.crop(center_crop_box(image.width, image.height, size))


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] → float32 scaled to [0, 1], then (x - mean) / std per channel."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.shape[-1:] != (3,):
    raise ValueError(f"expected uint8 images with 3 channels last, got {images.dtype} "
                     f"of shape {images.shape}.")
  return (images.astype(np.float32) / np.float32(255.0) - _MEAN) / _STD


def load_image(image: str | os.PathLike | bytes | Image.Image, size: int) -> np.ndarray:
  """An image file, its bytes or a PIL image → normalized float32 (size, size, 3)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel,redefined-outer-name
  from tinyclip_jax.data import decode  # pylint: disable=import-outside-toplevel
  rgb = decode.to_rgb(image) if isinstance(image, Image.Image) else decode.open_rgb(image)
  return normalize(np.asarray(resize_and_crop(rgb, size)))
