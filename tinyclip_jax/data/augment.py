"""Train-time image augmentation as open_clip trains CLIP: RandomResizedCrop(size,
scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic), then CLIP mean/std, as a tf.data map
(the box in TensorFlow, the bicubic resize by PIL as torchvision does it).

The crop box follows torchvision's `RandomResizedCrop.get_params` step for step:
ten attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first
box that fits wins, else the whole image clamped to the ratio range, centred. The
random numbers are stateless, from a per-sample seed, so a sample's crop depends on
(seed, position) only: not on thread scheduling, not on a restart.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from PIL import Image

from tinyclip_jax import preprocess

ATTEMPTS = 10


def crop_box(seed, height, width, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
  """(top, left, crop_height, crop_width) int32 for one image of height × width."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w
  u = tf.random.stateless_uniform([ATTEMPTS, 4], seed=seed)
  target = area * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
  cw = tf.round(tf.sqrt(target * aspect))  # round half to even, as Python's round()
  ch = tf.round(tf.sqrt(target / aspect))
  fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))
  # torch.randint(0, n + 1): uniform integer in [0, n]
  top = tf.floor(u[first, 2] * (h - ch[first] + 1))
  left = tf.floor(u[first, 3] * (w - cw[first] + 1))

  in_ratio = w / h  # fallback: central crop of the whole image clamped to the ratio range
  fw = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
  fh = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  ftop, fleft = tf.floor((h - fh) / 2), tf.floor((w - fw) / 2)
  ok = tf.reduce_any(fits)
  box = tf.stack([
      tf.where(ok, top, ftop),
      tf.where(ok, left, fleft),
      tf.where(ok, ch[first], fh),
      tf.where(ok, cw[first], fw)
  ])
  return tf.cast(box, tf.int32)


def _pil_resize(crop: np.ndarray, size) -> np.ndarray:
  return np.asarray(Image.fromarray(crop).resize((int(size), int(size)), Image.BICUBIC))


def resize(image, size: int):
  """uint8 HWC → uint8 size × size with PIL's bicubic, as torchvision resizes a PIL crop
  and as the eval path (tinyclip_jax.preprocess) resizes. PIL is the reference and,
  measured, 4× faster than tf.image's antialiased bicubic done PIL's way (two passes
  with uint8 rounding in between: one float pass differs by up to 23 levels); its C
  resize releases the GIL, so tf.data's threads run it in parallel."""
  out = tf.numpy_function(_pil_resize, [image, size], tf.uint8, stateful=False)
  return tf.ensure_shape(out, [size, size, 3])


def normalize(image):
  """float [0, 255] → CLIP mean/std normalized float32."""
  mean = tf.constant(preprocess.CLIP_MEAN, tf.float32)
  std = tf.constant(preprocess.CLIP_STD, tf.float32)
  return (image / 255.0 - mean) / std


def random_resized_crop(image, seed, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
  """uint8 HWC → normalized float32 (size, size, 3)."""
  shape = tf.shape(image)
  top, left, ch, cw = tf.unstack(crop_box(seed, shape[0], shape[1], scale, ratio))
  crop = image[top:top + ch, left:left + cw]  # crop, then resize: edges clamp at the crop
  return normalize(tf.cast(resize(crop, size), tf.float32))
