"""One image → one tensor: the training reader (tf.data, `decode.decode_tf`) and the
evaluation/embedding path (`preprocess.load_image`, `eval.encode.decode`) decode every
mode PIL writes in JPEG, PNG and WebP (and GIF, BMP) to the same uint8 pixels, and
those are the rule applied by hand here: the source pixels for lossless files (16-bit
→ high byte, alpha dropped, palette looked up), PIL's own decode + convert("RGB")
for lossy ones. Exact: equality of uint8, or 1e-6 on normalized floats (one level is
1/255/0.27 ≈ 0.015)."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from tinyclip_jax import embed, preprocess
from tinyclip_jax.data import decode, make_shards, pipeline, sharded
from tinyclip_jax.eval import encode as eval_encode
from tinyclip_jax.train import defaults

S = 32  # square sources: the identity crop in the end-to-end check needs them
RNG = np.random.default_rng(0)


def smooth(h, w, channels=3):
  """Photo-like content (JPEG's subsampling and DCT matter), plus some noise."""
  small = RNG.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3)).astype(np.uint8)
  x = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(int)
  x = np.clip(x + RNG.integers(-20, 21, x.shape), 0, 255).astype(np.uint8)
  return x[..., :channels] if channels > 1 else x[..., 0]


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def by_pil(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def gray3(x):
  return np.repeat(x[..., None], 3, axis=-1)


def jpeg_cases(h, w, tag=""):
  rgb = smooth(h, w)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display"
  files = {
      "jpeg_444": encode(Image.fromarray(rgb), "JPEG", subsampling=0, quality=90),
      "jpeg_422": encode(Image.fromarray(rgb), "JPEG", subsampling=1, quality=90),
      "jpeg_420": encode(Image.fromarray(rgb), "JPEG", subsampling=2, quality=75),
      "jpeg_progressive": encode(Image.fromarray(rgb), "JPEG", progressive=True),
      "jpeg_exif_rotated": encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes()),
      "jpeg_L": encode(Image.fromarray(rgb[..., 0]), "JPEG"),
      "jpeg_CMYK": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
  }
  return {k + tag: (v, by_pil(v), "jpg") for k, v in files.items()}


def lossless_cases():
  """name → (bytes, expected pixels from the source by hand, shard extension)."""
  rgb, rgba = smooth(S, S), np.concatenate([smooth(S, S), smooth(S, S, 1)[..., None]], -1)
  gray, bits = smooth(S, S, 1), smooth(S, S, 1) > 127
  u16 = RNG.integers(0, 65536, (S, S)).astype(np.uint16)
  idx, pal = RNG.integers(0, 16, (S, S)).astype(np.uint8), RNG.integers(0, 256, (256, 3))
  p = Image.fromarray(idx, "P")
  p.putpalette(pal.astype(np.uint8).flatten().tolist())
  return {
      "png_RGB": (encode(Image.fromarray(rgb), "PNG"), rgb, "png"),
      "png_RGBA": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgba[..., :3], "png"),
      "png_L": (encode(Image.fromarray(gray), "PNG"), gray3(gray), "png"),
      "png_LA": (encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"), gray3(rgba[..., 0]),
                 "png"),
      "png_1": (encode(Image.fromarray(bits), "PNG"), gray3(bits.astype(np.uint8) * 255), "png"),
      "png_P_transparent": (encode(p, "PNG", transparency=0), pal[idx].astype(np.uint8), "png"),
      "png_I16": (encode(Image.fromarray(u16), "PNG"), gray3((u16 >> 8).astype(np.uint8)), "png"),
      "webp_lossless": (encode(Image.fromarray(rgb), "WEBP", lossless=True), rgb, "webp"),
      "webp_RGBA": (encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True),
                    rgba[..., :3], "webp"),
      "bmp_RGB": (encode(Image.fromarray(rgb), "BMP"), rgb, "png"),
  }


def lossy_cases():
  webp = encode(Image.fromarray(smooth(S, S)), "WEBP", quality=60)
  gif = encode(Image.fromarray(smooth(S, S)).convert("P"), "GIF")
  mpo = encode(Image.fromarray(smooth(S, S)), "MPO", save_all=True,
               append_images=[Image.fromarray(smooth(S, S))])  # a camera's JPEG + a second frame
  return {**jpeg_cases(S, S), "webp_lossy": (webp, by_pil(webp), "webp"),
          "gif_P": (gif, by_pil(gif), "png"), "jpeg_mpo": (mpo, by_pil(mpo), "jpg")}


CASES = {**lossless_cases(), **lossy_cases()}
ODD = jpeg_cases(31, 45, "_31x45")  # odd sizes: chroma upsampling at the edges
MODES = {"png_RGBA": "RGBA", "png_L": "L", "png_LA": "LA", "png_1": "1", "png_P_transparent": "P",
         "png_I16": "I;16", "webp_RGBA": "RGBA", "jpeg_L": "L", "jpeg_CMYK": "CMYK",
         "gif_P": "P", "jpeg_444": "RGB"}


def test_the_cases_are_what_they_say():
  for name, mode in MODES.items():
    with Image.open(io.BytesIO(CASES[name][0])) as im:
      assert im.mode == mode, name
  sampling = {k: JpegImagePlugin.get_sampling(Image.open(io.BytesIO(CASES[k][0])))
              for k in ("jpeg_444", "jpeg_422", "jpeg_420")}
  assert sampling == {"jpeg_444": 0, "jpeg_422": 1, "jpeg_420": 2}
  assert Image.open(io.BytesIO(CASES["jpeg_progressive"][0])).info.get("progressive")
  with Image.open(io.BytesIO(CASES["jpeg_mpo"][0])) as im:
    assert im.format == "MPO" and im.n_frames == 2
  with Image.open(io.BytesIO(CASES["jpeg_exif_rotated"][0])) as im:
    assert im.getexif()[0x0112] == 6
    turned = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  assert not np.array_equal(turned, CASES["jpeg_exif_rotated"][1])  # honouring it would turn
  # PIL's bare convert would clip 16-bit samples at 255; the rule keeps the high byte.
  assert not np.array_equal(by_pil(CASES["png_I16"][0]), CASES["png_I16"][1])


GRAPH = tf.function(decode.decode_tf, input_signature=[tf.TensorSpec([], tf.string)])


@pytest.mark.parametrize("name", sorted({**CASES, **ODD}))
def test_every_path_decodes_to_the_rule(name):
  data, want, _ = {**CASES, **ODD}[name]
  np.testing.assert_array_equal(decode.decode(data), want)  # the PIL rule (eval, embed)
  np.testing.assert_array_equal(GRAPH(tf.constant(data)).numpy(), want)  # training's graph
  np.testing.assert_array_equal(decode.decode_tf(tf.constant(data)).numpy(), want)  # eager
  h, w = want.shape[:2]
  if h == w:  # at the source size the eval transform is only normalize
    np.testing.assert_allclose(preprocess.load_image(data, h), preprocess.normalize(want),
                               rtol=0, atol=1e-6)


def test_the_old_training_decoder_differs():
  """Version 1 (tf.io.decode_image: libjpeg's fast DCT) is what this test catches."""
  data, want, _ = CASES["jpeg_420"]
  old = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  assert np.abs(old.astype(int) - want).max() > 0
  with pytest.raises(tf.errors.InvalidArgumentError):  # and it dropped WebPs with alpha
    tf.io.decode_image(CASES["webp_RGBA"][0], channels=3, expand_animations=False)


def test_tf_decodes_plain_jpegs_and_pil_the_rest(monkeypatch):
  """The graph's fast path is TF's accurate-DCT JPEG decoder for 1- and 3-component
  JPEGs only: with the PIL branch broken, those still decode, the others fail."""

  def broken(_):
    raise RuntimeError("PIL branch")

  monkeypatch.setattr(decode, "decode", broken)
  graph = tf.function(decode.decode_tf, input_signature=[tf.TensorSpec([], tf.string)])
  for name, (data, want, _) in {**CASES, **ODD}.items():
    if name.startswith("jpeg") and "CMYK" not in name:
      np.testing.assert_array_equal(graph(tf.constant(data)).numpy(), want)
    else:
      with pytest.raises(tf.errors.OpError, match="PIL branch"):
        graph(tf.constant(data))


def test_modes_only_pil_images_arrive_in():
  """PA, I and F come from no supported file, but a PIL image handed to the eval path
  may hold them: same rule."""
  pal = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
  idx = RNG.integers(0, 256, (4, 5)).astype(np.uint8)
  pa = Image.fromarray(np.stack([idx, idx], -1), "LA").convert("PA")  # a grey palette + alpha
  pa.putpalette(pal.flatten().tolist())
  np.testing.assert_array_equal(np.asarray(decode.to_rgb(pa)), pal[idx])
  ints = np.array([[-5, 0, 255, 256, 65535, 70000]], np.int32)
  np.testing.assert_array_equal(np.asarray(decode.to_rgb(Image.fromarray(ints, "I")))[..., 1],
                                [[0, 0, 0, 1, 255, 255]])
  floats = np.array([[-3.2, 0.5, 2.5, 254.6, 300.0]], np.float32)  # PIL: clip, truncate
  np.testing.assert_array_equal(np.asarray(decode.to_rgb(Image.fromarray(floats, "F")))[..., 2],
                                [[0, 0, 2, 254, 255]])


def test_unsupported_or_broken_files_fail_on_every_path(tmp_path):
  tiff = encode(Image.fromarray(smooth(S, S)), "TIFF")
  cut = CASES["png_RGB"][0][:200]
  for data in (tiff, cut):
    with pytest.raises((UnidentifiedImageError, OSError)):
      decode.decode(data)
    with pytest.raises(tf.errors.OpError):
      GRAPH(tf.constant(data))
  (tmp_path / "x.png").write_bytes(tiff)
  with pytest.raises(embed.UsageError, match="not a readable image"):
    embed._load_one(str(tmp_path / "x.png"), S)  # pylint: disable=protected-access


def test_embed_and_eval_read_the_same_pixels(tmp_path):
  names = sorted(CASES)
  for n in names:
    (tmp_path / f"{n}.{CASES[n][2]}").write_bytes(CASES[n][0])
  files = sorted(p.name for p in tmp_path.iterdir())
  _, load = embed.image_source(str(tmp_path), S)
  want = np.stack([preprocess.normalize(CASES[f.rsplit(".", 1)[0]][1]) for f in files])
  np.testing.assert_allclose(load(0, len(files)), want, rtol=0, atol=1e-6)
  evaluated = eval_encode.decode([CASES[n][0] for n in names], S)
  np.testing.assert_allclose(evaluated, np.stack([preprocess.normalize(CASES[n][1])
                                                  for n in names]), rtol=0, atol=1e-6)


def test_training_reader_end_to_end(tmp_path):
  """A shard with every case (and two files that only fail at decode) through
  ShardedPairs with the identity crop (scale 1, ratio 1, size = source size: the
  resize returns the crop unchanged): the batch is the rule, normalized."""
  broken = {"0_png_cut": CASES["png_RGB"][0][:300], "0_webp_cut": CASES["webp_lossless"][0][:60]}
  items = [(k, {"png": v, "txt": b"a broken file"}) for k, v in broken.items()]
  items += [(n, {ext: data, "txt": f"a picture {n}".encode()})
            for n, (data, _, ext) in sorted(CASES.items())]
  make_shards.write_tar(str(tmp_path / "00000.tar"), items)
  cfg = defaults.base_config().data
  cfg.update(kind="webdataset", train=str(tmp_path / "00000.tar"), shards_per_window=1,
             shuffle_buffer=1, crop_scale_min=1.0, crop_scale_max=1.0, crop_ratio_min=1.0,
             crop_ratio_max=1.0)
  pipeline.check(cfg)
  src = sharded.ShardedPairs(cfg, S, 16, len(CASES))
  b = src.next_batch()
  assert b["keys"] == sorted(CASES)
  for key, image in zip(b["keys"], b["images"]):
    np.testing.assert_allclose(image, preprocess.normalize(CASES[key][1]), rtol=0, atol=1e-6,
                               err_msg=key)
    np.testing.assert_allclose(image, preprocess.load_image(CASES[key][0], S), rtol=0, atol=1e-6,
                               err_msg=key)
  assert src.get_state()["skipped"]["corrupt_image"] == 2
