"""Train augmentation against torchvision's RandomResizedCrop spelled out in torch,
and against the eval path (PIL bicubic) when the crop is the whole image."""
import math

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image
from scipy import stats

from tinyclip_jax import preprocess
from tinyclip_jax.data import augment, synthetic

SCALE, RATIO = (0.9, 1.0), (3 / 4, 4 / 3)


def torchvision_get_params(height, width, scale, ratio, gen):
  """torchvision.transforms.RandomResizedCrop.get_params, line by line."""
  area = height * width
  log_ratio = torch.log(torch.tensor(ratio))
  for _ in range(10):
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
    aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                     generator=gen)).item()
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = torch.randint(0, height - h + 1, size=(1,), generator=gen).item()
      j = torch.randint(0, width - w + 1, size=(1,), generator=gen).item()
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def boxes(height, width, n, scale=SCALE, ratio=RATIO, seed=0):
  ds = tf.data.Dataset.range(n).map(lambda i: augment.crop_box(
      tf.stack([tf.constant(seed, tf.int64), i]), height, width, scale, ratio))
  return next(iter(ds.batch(n))).numpy()  # (n, 4): top, left, h, w


@pytest.mark.parametrize("height,width", [(120, 160), (200, 100), (64, 64)])
def test_crop_boxes_inside_and_distributed_as_torchvision(height, width):
  ours = boxes(height, width, 2000)
  top, left, h, w = ours.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all() and (h > 0).all()
  gen = torch.Generator().manual_seed(0)
  ref = np.array([torchvision_get_params(height, width, SCALE, RATIO, gen) for _ in range(2000)])
  for name, a, b in (("area", h * w, ref[:, 2] * ref[:, 3]), ("aspect", w / h,
                                                              ref[:, 3] / ref[:, 2]),
                     ("top", top / (height - h + 1), ref[:, 0] / (height - ref[:, 2] + 1))):
    p = stats.ks_2samp(a, b).pvalue  # fixed seeds: deterministic, not flaky
    assert p > 0.01, (name, p)
  frac = h * w / (height * width)
  if RATIO[0] <= width / height <= RATIO[1]:  # boxes fit: area within scale up to rounding
    assert frac.min() >= 0.9 * (1 - 2 / min(height, width)) and frac.max() <= 1.0
  else:  # 200 × 100 is too narrow for any box: always the centre fallback
    assert (frac == frac[0]).all()


def test_fallback_is_torchvisions_centre_crop():
  # a 300 × 50 strip fits no box of ≥ 90% area at aspect ≥ 3/4: always the fallback
  gen = torch.Generator().manual_seed(0)
  ref = torchvision_get_params(300, 50, SCALE, RATIO, gen)
  assert ref == (116, 0, 67, 50)
  np.testing.assert_array_equal(boxes(300, 50, 5), np.tile(ref, (5, 1)))
  ref = torchvision_get_params(40, 400, SCALE, RATIO, gen)  # and the other way round
  np.testing.assert_array_equal(boxes(40, 400, 1)[0], ref)


def test_same_seed_same_crop_other_seed_other_crop():
  np.testing.assert_array_equal(boxes(120, 160, 50, seed=3), boxes(120, 160, 50, seed=3))
  assert (boxes(120, 160, 50, seed=3) != boxes(120, 160, 50, seed=4)).any()


@pytest.mark.parametrize("src,dst", [(96, 32), (96, 48), (40, 64), (64, 224)])
def test_whole_image_crop_is_the_eval_path(src, dst):
  """scale=1, ratio=1 on a square image: the crop is the image, so the output must be
  CLIP's eval preprocessing (tinyclip_jax.preprocess: PIL bicubic) exactly."""
  spec = synthetic.SyntheticSpec(image_size=src, seed=0)
  image = synthetic.make_example(spec, "train", 3)[0]
  noise = np.random.default_rng(0).integers(0, 256, (src, src, 3)).astype(np.uint8)
  for img in (image, noise):
    ours = augment.random_resized_crop(img, tf.constant([1, 2], tf.int64), dst, (1.0, 1.0),
                                       (1.0, 1.0)).numpy()
    ref = preprocess.load_image(Image.fromarray(img), dst)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_crop_then_resize_as_torchvision():
  """A random box: the pixels of the box, resized by PIL bicubic (torchvision's
  F.resized_crop on a PIL image is img.crop(box).resize(size, BICUBIC))."""
  img = np.random.default_rng(1).integers(0, 256, (120, 160, 3)).astype(np.uint8)
  seed = tf.constant([5, 6], tf.int64)
  top, left, h, w = augment.crop_box(seed, 120, 160, SCALE, RATIO).numpy()
  ours = augment.random_resized_crop(img, seed, 48, SCALE, RATIO).numpy()
  ref = Image.fromarray(img).crop((left, top, left + w, top + h)).resize((48, 48), Image.BICUBIC)
  np.testing.assert_allclose(ours, preprocess.normalize(np.asarray(ref)), rtol=0, atol=1e-6)
