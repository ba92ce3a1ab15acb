"""The faster training input gives the same pixels, and its opt-in options are what they
say. References by hand: PIL decodes (with `Image.draft` for reduced-DCT decoding),
numpy crops, PIL's bicubic resizes, CLIP's normalization in float32 numpy; the crop
box comes from `augment.crop_box` (itself checked against torchvision in
test_data_augment.py). Pixels compare bit for bit (assert_array_equal on float32)."""
import io
import json
import math
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tinyclip_jax import preprocess
from tinyclip_jax.data import (augment, decode, make_shards, pipeline, resize_shards, sharded,
                               shards, teacher_cache)
from tinyclip_jax.train import defaults

SIZE = 24
RNG = np.random.default_rng(0)
MEAN, STD = np.float32(preprocess.CLIP_MEAN), np.float32(preprocess.CLIP_STD)


def smooth(h, w):
  small = RNG.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3)).astype(np.uint8)
  x = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(int)
  return np.clip(x + RNG.integers(-20, 21, x.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt="JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def normalize_by_hand(x: np.ndarray) -> np.ndarray:
  return (x.astype(np.float32) / np.float32(255) - MEAN) / STD


def pil_draft(data: bytes, r: int) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    w, h = im.size
    if r > 1:
      im.draft("RGB", (w // r, h // r))
    return np.asarray(im.convert("RGB"))


def images():
  """name → (bytes, extension): JPEGs of each subsampling at odd sizes, large and small,
  and files the TF decoder leaves to PIL (CMYK, PNG)."""
  rgb = lambda h, w: Image.fromarray(smooth(h, w))
  return {
      "a_420_big": (encode(rgb(263, 251), subsampling=2, quality=80), "jpg"),
      "b_422_mid": (encode(rgb(97, 111), subsampling=1), "jpg"),
      "c_444_mid": (encode(rgb(121, 100), subsampling=0), "jpg"),
      "d_progressive": (encode(rgb(150, 133), progressive=True), "jpg"),
      "e_gray": (encode(rgb(77, 90).convert("L")), "jpg"),
      "f_small": (encode(rgb(33, 41)), "jpg"),
      "g_cmyk": (encode(rgb(120, 120).convert("CMYK")), "jpg"),
      "h_png": (encode(rgb(140, 120), "PNG"), "png"),
  }


IMAGES = images()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("speed") / "00000.tar")
  make_shards.write_tar(path, [(k, {ext: data, "txt": f"a picture {k}".encode()})
                               for k, (data, ext) in sorted(IMAGES.items())])
  return path


def data_cfg(path, **kw):
  cfg = defaults.base_config().data
  cfg.update(kind="webdataset", train=path, shards_per_window=1, shuffle_buffer=1, seed=3, **kw)
  return cfg


def batch(cfg):
  src = sharded.ShardedPairs(cfg, SIZE, 16, len(IMAGES))
  try:
    b = src.next_batch()
  finally:
    src.close()
  assert b["keys"] == sorted(IMAGES)  # shuffle_buffer 1: the shard's order, index = position
  return b


def box_of(cfg, index, h, w):
  seed = tf.stack([sharded._fingerprint(cfg.seed, tf.constant(0, tf.int64),  # pylint: disable=protected-access
                                        tf.constant(0, tf.int64)), tf.constant(index, tf.int64)])
  scale, ratio = (cfg.crop_scale_min, cfg.crop_scale_max), (cfg.crop_ratio_min, cfg.crop_ratio_max)
  return [int(v) for v in augment.crop_box(seed, h, w, scale, ratio).numpy()]


def crop_resize_by_hand(pixels, top, left, ch, cw):
  crop = pixels[top:top + ch, left:left + cw]
  return normalize_by_hand(np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.BICUBIC)))


def test_random_crops_are_the_rule_by_hand(shard):
  """The default pipeline (chunked reader, row-wise normalize) against PIL by hand:
  decode, crop, bicubic resize, normalize, equal to the bit."""
  cfg = data_cfg(shard)
  b = batch(cfg)
  for i, (key, image) in enumerate(zip(b["keys"], b["images"])):
    pixels = pil_draft(IMAGES[key][0], 1)
    want = crop_resize_by_hand(pixels, *box_of(cfg, i, *pixels.shape[:2]))
    np.testing.assert_array_equal(image, want, err_msg=key)


def test_chunked_reader_yields_the_readers_records(tmp_path):
  bad = {1: "corrupt_image", 3: "missing_caption", 4: "tiny_image", 6: "bad_utf8"}
  paths = make_shards.write_shards(str(tmp_path), 1, 9, 16, bad=bad)
  path = next(iter(paths))
  with open(path, "rb") as f, tarfile.open(path) as tar:
    data, cut = f.read(), tar.getmembers()[14].offset_data + 10
  with open(tmp_path / "cut.tar", "wb") as f:
    f.write(data[:cut])  # truncated in a member: complete samples, then a marker
  for p in (path, str(tmp_path / "cut.tar")):
    args = (p, 16, 50_000_000, "caption")
    want = list(shards.read_tar(*args))
    got = [r for c in shards.in_chunks(shards.read_tar, *args, size=4) for r in zip(*c)]
    assert got == want and len(want) > 4
  assert want[-1][3] == shards.CODE["truncated_tar"]


@pytest.mark.parametrize("width", [224, None])
def test_normalize_is_clips_formula_to_the_bit(width):
  """In tf.data (where the pipeline runs it) and eagerly. (A tf.function's graph
  optimizer turns the division by a constant into a multiplication, 1 ulp off, before
  and after the row-wise change alike: the pipeline test above checks the real path.)"""
  x = RNG.integers(0, 256, (5, 224, 3)).astype(np.uint8)
  spec = tf.TensorSpec([None, width, 3], tf.float32)
  ds = tf.data.Dataset.from_generator(lambda: [x.astype(np.float32)], output_signature=spec)
  for got in (ds.map(augment.normalize).get_single_element(),
              augment.normalize(tf.constant(x, tf.float32))):
    np.testing.assert_array_equal(got.numpy(), normalize_by_hand(x))


JPEG_KINDS = {"420": dict(subsampling=2), "422": dict(subsampling=1), "444": dict(subsampling=0),
              "progressive": dict(progressive=True)}


@pytest.mark.parametrize("kind", [*JPEG_KINDS, "gray"])
def test_reduced_dct_decoding_is_pil_draft(kind):
  for h, w in ((61, 77), (97, 45), (64, 64)):
    im = Image.fromarray(smooth(h, w))
    data = encode(im.convert("L")) if kind == "gray" else encode(im, **JPEG_KINDS[kind])
    graph = tf.function(decode.jpeg_tf)
    for r in decode.JPEG_SCALES:
      got = graph(tf.constant(data), tf.constant(r, tf.int32)).numpy()
      assert got.shape == (math.ceil(h / r), math.ceil(w / r), 3)
      np.testing.assert_array_equal(got, pil_draft(data, r), err_msg=f"{kind} {h}x{w} 1/{r}")


def ratio_by_hand(name, box, jpeg_scale):
  """decode.JPEG_SCALES' largest r <= jpeg_scale leaving the crop >= SIZE·r on its
  shorter side; 1 for files PIL decodes (CMYK, PNG)."""
  if name in ("g_cmyk", "h_png"):
    return 1
  return max(r for r in (1, 2, 4, 8) if r <= jpeg_scale and min(box[2:]) >= r * SIZE)


@pytest.mark.parametrize("jpeg_scale", [4, 8])
def test_jpeg_scale_is_draft_then_the_scaled_crop_by_hand(shard, jpeg_scale):
  """The crop box is drawn on the full size, the JPEG decoded at 1/r as PIL's draft
  decodes it, the box scaled (start rounded down, end up); where r = 1 the pixels are
  the default pipeline's, elsewhere they differ."""
  cfg = data_cfg(shard, jpeg_scale=jpeg_scale)
  b, exact = batch(cfg), batch(data_cfg(shard))
  used = set()
  for i, (key, image) in enumerate(zip(b["keys"], b["images"])):
    data = IMAGES[key][0]
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
    top, left, ch, cw = box_of(cfg, i, h, w)
    r = ratio_by_hand(key, (top, left, ch, cw), jpeg_scale)
    used.add(r)
    pixels = pil_draft(data, r)
    assert pixels.shape[:2] == (math.ceil(h / r), math.ceil(w / r))
    t, l = top // r, left // r
    want = crop_resize_by_hand(pixels, t, l, -(-(top + ch) // r) - t, -(-(left + cw) // r) - l)
    np.testing.assert_array_equal(image, want, err_msg=f"{key} 1/{r}")
    assert np.array_equal(image, exact["images"][i]) == (r == 1), key
  assert used == ({1, 2, 4, 8} if jpeg_scale == 8 else {1, 2, 4})


@pytest.mark.parametrize("value", [3, 0, 16, True, "2", 2.5])
def test_an_invalid_jpeg_scale_is_refused_in_one_sentence(shard, value):
  cfg = ml_collections.ConfigDict({**data_cfg(shard).to_dict(), "jpeg_scale": value})
  message = (f"data.jpeg_scale is {value!r} but must be one of (1, 2, 4, 8) (1 = decode at "
             "full size, the exact rule).")
  with pytest.raises(ValueError) as e:
    pipeline.check(cfg)
  assert str(e.value) == message
  with pytest.raises(ValueError, match="data.jpeg_scale is"):
    sharded.ShardedPairs(cfg, SIZE, 16, 4)


def test_a_teacher_cache_for_another_jpeg_scale_is_refused():
  config, teacher = defaults.base_config(), ml_collections.ConfigDict({"width": 8})
  built = dict(teacher_cache.describe(config, teacher, "d"), format=teacher_cache.FORMAT, steps=9)
  config.data.jpeg_scale = 2
  now = teacher_cache.describe(config, teacher, "d")
  with pytest.raises(teacher_cache.CacheError) as e:
    teacher_cache.check(built, now, 5, "/c")
  assert str(e.value) == (
      "teacher.cache /c was built from JPEGs decoded with data.jpeg_scale=1 but this run "
      "sets data.jpeg_scale=2, which decodes other pixels; rebuild the cache or set "
      "data.jpeg_scale=1.")
  older = {k: v for k, v in built.items() if k != "jpeg_scale"}  # before the field existed
  teacher_cache.check(older, dict(now, jpeg_scale=1), 5, "/c")
  with pytest.raises(teacher_cache.CacheError, match="data.jpeg_scale=1 but this run sets "
                     "data.jpeg_scale=2"):
    teacher_cache.check(older, now, 5, "/c")
  teacher_cache.check(dict(built, jpeg_scale=2), now, 5, "/c")


def tar_members(path) -> list[tuple[str, bytes]]:
  with tarfile.open(path) as tar:
    return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def resized_by_hand(data: bytes, side: int, quality: int) -> bytes:
  """The tool's rule spelled out: RGB by PIL, shorter side to `side`, the longer
  round(longer · side / shorter), bicubic, JPEG at `quality`."""
  rgb = Image.open(io.BytesIO(data)).convert("RGB")
  w, h = rgb.size
  size = (side, round(h * side / w)) if w <= h else (round(w * side / h), side)
  return encode(rgb.resize(size, Image.BICUBIC), quality=quality)


@pytest.fixture(scope="module")
def source_shard(tmp_path_factory):
  d = tmp_path_factory.mktemp("src")
  big = Image.fromarray(smooth(90, 131))
  items = [
      ("s0", {"jpg": encode(big, quality=92), "txt": b"a big jpeg", "json": b'{"k": 0}'}),
      ("s1", {"png": encode(Image.fromarray(smooth(75, 61)), "PNG"), "txt": b"a png",
              "cls": b"7"}),
      ("s2", {"jpg": encode(Image.fromarray(smooth(40, 50))), "txt": b"small enough"}),
      ("s3", {"jpg": encode(big)[:300], "txt": b"a cut jpeg"}),  # does not decode
      ("s4", {"txt": b"no image", "json": b"{}"}),
      ("s5", {"webp": encode(Image.fromarray(smooth(60, 60)).convert("L"), "WEBP"),
              "txt": b"grey webp"}),
  ]
  make_shards.write_tar(str(d / "00000.tar"), items)
  return d, dict(items)


def test_resize_tool_resizes_the_image_and_keeps_the_rest(source_shard, tmp_path):
  src, items = source_shard
  out = tmp_path / "out"
  assert resize_shards.main([f"--src={src}/*.tar", f"--out={out}", "--shorter_side=48",
                             "--quality=90"]) == 0
  got = tar_members(out / "00000.tar")
  want = []
  for key, parts in items.items():
    for ext, data in parts.items():
      if key in ("s0", "s1", "s5") and ext in ("jpg", "png", "webp"):
        want.append((f"{key}.{'jpg' if ext != 'jpg' else ext}", resized_by_hand(data, 48, 90)))
      else:  # small, undecodable, not an image: byte for byte
        want.append((f"{key}.{ext}", data))
  assert [n for n, _ in got] == [n for n, _ in want]
  for (name, data), (_, expected) in zip(got, want):
    assert data == expected, name
  assert Image.open(io.BytesIO(dict(got)["s0.jpg"])).size == (70, 48)  # round(131·48/90)
  cfg = data_cfg(str(out / "00000.tar"))
  src_pairs = sharded.ShardedPairs(cfg, SIZE, 16, 4)
  try:
    assert src_pairs.next_batch()["keys"] == ["s0", "s1", "s2", "s5"]
    assert src_pairs.get_state()["skipped"]["corrupt_image"] == 1
  finally:
    src_pairs.close()


def test_resize_tool_refuses_to_overwrite_and_bad_flags(source_shard, tmp_path, capsys):
  src = source_shard[0]
  out = tmp_path / "out"
  out.mkdir()
  (out / "00000.tar").write_bytes(b"precious")
  argv = [f"--src={src}/*.tar", f"--out={out}", "--shorter_side=48"]
  assert resize_shards.main(argv) == 2
  assert (out / "00000.tar").read_bytes() == b"precious"
  assert sorted(p.name for p in out.iterdir()) == ["00000.tar"]
  err = capsys.readouterr().err
  assert err == (f"error: {out}/00000.tar exists (1 of the 1 outputs do); resize_shards never "
                 "overwrites: give an empty --out or remove them.\n")
  for bad, message in ((["--shorter_side=0"], "--shorter_side=0 must be positive"),
                       (["--shorter_side=48", "--quality=101"], "--quality=101 must be in 1..100"),
                       (["--shorter_side=x"], "invalid int value")):
    assert resize_shards.main([f"--src={src}/*.tar", f"--out={tmp_path}/o2", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert resize_shards.main([f"--src={tmp_path}/none/*.tar", f"--out={tmp_path}/o3",
                             "--shorter_side=8"]) == 2
  assert "matches no file" in capsys.readouterr().err
  assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_resize_tool_keeps_the_complete_samples_of_a_truncated_shard(source_shard, tmp_path,
                                                                    capsys):
  src, items = source_shard
  data = (src / "00000.tar").read_bytes()
  cut = tmp_path / "in"
  cut.mkdir()
  with tarfile.open(src / "00000.tar") as tar:
    (cut / "00000.tar").write_bytes(data[:tar.getmembers()[6].offset_data + 10])  # in s2
  assert resize_shards.main([f"--src={cut}/00000.tar", f"--out={tmp_path}/out",
                             "--shorter_side=48"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["truncated"] == [str(cut / "00000.tar")]
  expected = [r[0] for r in shards.read_tar(str(cut / "00000.tar"), 1, 10**9)][:-1]  # - marker
  keys = sorted({n.split(".")[0] for n, _ in tar_members(tmp_path / "out" / "00000.tar")})
  assert keys == expected and 0 < len(keys) < len(items)
