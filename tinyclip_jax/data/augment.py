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
from tinyclip_jax.data import decode

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
  """float [0, 255] (h, w, 3) → CLIP mean/std normalized float32. With a static width the
  mean and std are tiled along rows of w·3 values: the same float32 operations, so the
  same bits, but broadcasting over a 3-wide innermost axis cost 2.5× as much."""
  w = image.shape[-2]
  if w is None or image.shape.rank != 3 or image.shape[-1] != 3:
    mean = tf.constant(preprocess.CLIP_MEAN, tf.float32)
    std = tf.constant(preprocess.CLIP_STD, tf.float32)
    return (image / 255.0 - mean) / std
  mean = tf.constant(np.tile(np.float32(preprocess.CLIP_MEAN), w))
  std = tf.constant(np.tile(np.float32(preprocess.CLIP_STD), w))
  rows = tf.reshape(image, [-1, w * 3])
  out = tf.reshape((rows / 255.0 - mean) / std, tf.shape(image))
  out.set_shape(image.shape)
  return out


def resize_crop(crop, size: int):
  """uint8 crop → normalized float32 (size, size, 3)."""
  return normalize(tf.cast(resize(crop, size), tf.float32))


def random_resized_crop(image, seed, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
  """uint8 HWC → normalized float32 (size, size, 3)."""
  shape = tf.shape(image)
  top, left, ch, cw = tf.unstack(crop_box(seed, shape[0], shape[1], scale, ratio))
  return resize_crop(image[top:top + ch, left:left + cw], size)  # edges clamp at the crop


def jpeg_ratio(box, size: int, jpeg_scale: int):
  """The DCT scaling r for a crop box: the largest of decode.JPEG_SCALES up to
  `jpeg_scale` that leaves the crop at least `size` on its shorter side, so that the
  bicubic resize still only shrinks."""
  scales = tf.constant(decode.JPEG_SCALES, tf.int32)
  short = tf.minimum(box[2], box[3])
  fits = tf.logical_and(scales <= jpeg_scale, short >= scales * size)
  return tf.reduce_max(tf.where(fits, scales, 1))


def scale_box(box, ratio):
  """A full-size crop box → the box covering it in the image decoded at 1/ratio
  (libjpeg's ceil(h/ratio) × ceil(w/ratio)): start rounded down, end up."""
  top, left, ch, cw = tf.unstack(box)
  up = lambda x: -(-x // ratio)
  return tf.stack([top // ratio, left // ratio, up(top + ch) - top // ratio,
                   up(left + cw) - left // ratio])


def decode_for_crop(encoded, box_of, size: int, jpeg_scale: int):
  """(uint8 pixels, crop box in them, full height, full width). `box_of(h, w)` gives
  the crop box of the full-size image (drawn by `crop_box`, or replayed from a teacher
  cache). With jpeg_scale 1 the image decodes by the rule (PIL's pixels). With
  jpeg_scale > 1 a 1/3-component JPEG is decoded at 1/r (`jpeg_ratio`, from its
  header's size) and the box scaled to match, so decoding and the resize work on up
  to r² fewer pixels; other files decode at full size."""
  if jpeg_scale == 1:
    image = decode.decode_tf(encoded)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    return image, box_of(h, w), h, w

  def by_header():
    hw = tf.io.extract_jpeg_shape(encoded)
    box = box_of(hw[0], hw[1])
    r = jpeg_ratio(box, size, jpeg_scale)
    return decode.jpeg_tf(encoded, r), scale_box(box, r), hw[0], hw[1]

  def by_pil():
    image = decode.pil_tf(encoded)
    shape = tf.shape(image)
    return image, box_of(shape[0], shape[1]), shape[0], shape[1]

  image, box, h, w = tf.cond(decode.decodes_in_tf(encoded), by_header, by_pil)
  return tf.ensure_shape(image, [None, None, 3]), box, h, w


def crop(pixels, box, size: int):
  """The box of decoded pixels → normalized float32 (size, size, 3)."""
  return resize_crop(pixels[box[0]:box[0] + box[2], box[1]:box[1] + box[3]], size)


def fingerprint(*ints):
  """A 64-bit seed from integers (tensors or Python ints), the same on every host."""
  return tf.bitcast(
      tf.strings.to_hash_bucket_fast(tf.strings.format("{}/{}/{}", list(ints)), 2**62), tf.int64)


def key_seed(augment_seed, k, key_hash):
  """The seed of a sample's k-th stored crop: from its key (data.augmentations > 0), so
  the crop is the same whatever process reads the sample at whatever position."""
  return tf.stack([fingerprint(augment_seed, k, 0), tf.cast(key_hash, tf.int64)])
