"""One image → one tensor: the rule by which training (and so the teacher cache),
evaluation and embedding turn an encoded image file into uint8 RGB pixels (h, w, 3). Its
reference is PIL, as in CLIP's own preprocessing; augmentation differs between the
paths, decoding never does.

The rule (DECODE_VERSION 2):
- Formats: JPEG (and MPO, a JPEG with extra frames), PNG, WebP, GIF, BMP, as PIL
  decodes them; the first frame of an animation. Anything else is undecodable.
- EXIF orientation is ignored: pixels as stored, as torchvision's PIL loader and
  TensorFlow's decoders read them. No ICC colour management.
- Colour: PIL's `convert("RGB")` (L and 1 replicated, P/PA through the palette,
  CMYK by PIL's formula, F clipped to 0..255), except 16-bit samples (modes I;16*,
  and I, clipped to 0..65535), which keep their high byte (v >> 8) as PIL itself
  reads 16-bit RGB(A) PNGs; `convert` would clip them at 255.
- Alpha is dropped, never composited: the colour channels as stored (what
  `convert("RGB")` does for RGBA, LA, PA and transparent palettes).

Version 1 was `tf.io.decode_image` in training, never recorded: libjpeg's fast
integer DCT puts JPEGs ~1 level off PIL on average and up to 14/255, and WebPs with
alpha did not decode. `decode_tf` is the training graph's decoder: TF's JPEG decoder
with the accurate integer DCT where it gives PIL's pixels (baseline or progressive
JPEGs with 1 or 3 components, any subsampling: both are libjpeg-turbo's ISLOW IDCT
with fancy upsampling; tests/test_decode.py checks it), PIL through
`tf.numpy_function` for everything else.

One opt-in exception, training only, off by default: `data.jpeg_scale` r > 1 lets
such JPEGs decode at 1/2, 1/4 or 1/8 of their size by libjpeg's DCT scaling where the
crop stays at least r times the image size (`jpeg_tf`, tinyclip_jax/data/augment.py
`decode_for_crop`): PIL's pixels after `Image.draft`, not the rule's. Teacher caches
record it and refuse a run with another value. (TF's `decode_and_crop_jpeg` is not
used: with subsampled chroma it differs from decode-then-crop at the crop's right
edge, by up to 42 levels measured.)
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

DECODE_VERSION = 2
JPEG_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scalings that data.jpeg_scale may use
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # PIL opens MPO files as JPEG
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
  """A decoded PIL image → its RGB image by the rule above."""
  if image.mode == "RGB":
    return image
  if image.mode in _SIXTEEN_BIT:
    high = (np.clip(np.asarray(image, np.int64), 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(np.repeat(high[..., None], 3, axis=-1), "RGB")
  with warnings.catch_warnings():  # PIL warns on palettes with transparency; alpha is dropped
    warnings.simplefilter("ignore", UserWarning)
    return image.convert("RGB")


def open_rgb(source: str | os.PathLike | bytes) -> Image.Image:
  """A file path or encoded bytes → the decoded RGB PIL image. Raises PIL's
  UnidentifiedImageError / OSError on files that are not decodable images."""
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  with Image.open(fp, formats=FORMATS) as image:
    image.load()
    return to_rgb(image)


def decode(encoded: bytes | np.ndarray) -> np.ndarray:
  """Encoded image bytes (or a 0-d array of them, as tf.numpy_function passes a
  scalar string eagerly) → uint8 (h, w, 3)."""
  if isinstance(encoded, np.ndarray):
    encoded = encoded.item()
  return np.asarray(open_rgb(bytes(encoded)))


def decodes_in_tf(encoded):
  """Whether `decode_tf` decodes this file with TF's JPEG decoder (a JPEG with 1 or 3
  components) rather than PIL; a scalar bool tensor."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def components_ok():  # CMYK/YCCK (4) and other counts go to PIL
    return tf.reduce_any(tf.equal(tf.io.extract_jpeg_shape(encoded)[2], [1, 3]))

  return tf.cond(tf.io.is_jpeg(encoded), components_ok, lambda: tf.constant(False))


def jpeg_tf(encoded, ratio=1):
  """A 1/3-component JPEG → uint8 (h, w, 3) tensor with the accurate integer DCT: PIL's
  pixels. `ratio` (an int tensor in JPEG_SCALES) decodes at 1/ratio by libjpeg's DCT
  scaling, ceil(h/ratio) × ceil(w/ratio): PIL's pixels after
  `Image.draft("RGB", (w // ratio, h // ratio))`, not the rule's."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def at(r):
    return lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE", ratio=r)

  if isinstance(ratio, int) and ratio == 1:
    return at(1)()
  index = tf.argmax(tf.cast(tf.equal(tf.constant(JPEG_SCALES, tf.int32), ratio), tf.int32))
  return tf.switch_case(tf.cast(index, tf.int32), [at(r) for r in JPEG_SCALES])


def pil_tf(encoded):
  """Any supported file → uint8 (h, w, 3) tensor by `decode` (PIL), off the graph."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.ensure_shape(tf.numpy_function(decode, [encoded], tf.uint8, stateful=False),
                         [None, None, 3])


def decode_tf(encoded):
  """A scalar string tensor → uint8 (h, w, 3) tensor, PIL's pixels (see above)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  image = tf.cond(decodes_in_tf(encoded), lambda: jpeg_tf(encoded), lambda: pil_tf(encoded))
  return tf.ensure_shape(image, [None, None, 3])


def check_jpeg_scale(value) -> int:
  """data.jpeg_scale as an int, or a ValueError naming the allowed values."""
  if isinstance(value, bool) or value not in JPEG_SCALES:
    raise ValueError(f"data.jpeg_scale is {value!r} but must be one of {JPEG_SCALES} "
                     "(1 = decode at full size, the exact rule).")
  return int(value)
