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
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

DECODE_VERSION = 2
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


def decode_tf(encoded):
  """A scalar string tensor → uint8 (h, w, 3) tensor, PIL's pixels (see above)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def accurate_jpeg():
    return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")

  def by_pil():
    return tf.numpy_function(decode, [encoded], tf.uint8, stateful=False)

  def components_ok():  # CMYK/YCCK (4) and other counts go to PIL
    return tf.reduce_any(tf.equal(tf.io.extract_jpeg_shape(encoded)[2], [1, 3]))

  fast = tf.cond(tf.io.is_jpeg(encoded), components_ok, lambda: tf.constant(False))
  return tf.ensure_shape(tf.cond(fast, accurate_jpeg, by_pil), [None, None, 3])
