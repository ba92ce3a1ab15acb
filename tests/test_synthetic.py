"""The embedded procedural dataset: determinism, captions, image content, zero-shot split, CLI."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tinyclip_jax.data import synthetic as syn
from tinyclip_jax.data.synthetic import (SyntheticSpec, make_batch, make_example, make_zeroshot,
                                         zeroshot_classes, zeroshot_prompts)

SPEC = SyntheticSpec(image_size=32)
SPEC64 = SyntheticSpec(image_size=64)


def _chromatic(img):
  """Mask of coloured pixels (backgrounds are grey) and each pixel's nearest palette index."""
  x = img.astype(np.float32)
  mask = x.max(-1) - x.min(-1) > 60
  nearest = ((x[..., None, :] - syn.PALETTE)**2).sum(-1).argmin(-1)
  return mask, nearest


def test_deterministic_by_index():
  a = make_batch(SPEC, "train", 100, 8)
  b = make_batch(SPEC, "train", 100, 8)
  np.testing.assert_array_equal(a["images"], b["images"])
  assert a["captions"] == b["captions"]
  for j in (0, 5):  # one example regenerates alone, identically to its place in a batch
    img, cap, attrs = make_example(SPEC, "train", 100 + j)
    np.testing.assert_array_equal(img, a["images"][j])
    assert cap == a["captions"][j] and attrs == a["attributes"][j]
  assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
  other_seed = make_batch(SyntheticSpec(image_size=32, seed=1), "train", 100, 8)
  other_split = make_batch(SPEC, "eval", 100, 8)
  for o in (other_seed, other_split):
    assert o["captions"] != a["captions"]
    assert not np.array_equal(o["images"], a["images"])


def test_bad_arguments():
  with pytest.raises(ValueError):
    make_batch(SPEC, "test", 0, 1)
  with pytest.raises(ValueError):
    make_batch(SPEC, "train", 0, 0)
  with pytest.raises(ValueError):
    SyntheticSpec(max_objects=5)


def test_object_counts():
  b = make_batch(SPEC, "train", 0, 400)
  n = np.array([len(a["objects"]) for a in b["attributes"]])
  assert set(n) == {1, 2} and 0.4 < (n == 1).mean() < 0.6
  many = SyntheticSpec(image_size=32, max_objects=4, single_object_prob=0.0)
  b = make_batch(many, "train", 0, 200)
  assert {len(a["objects"]) for a in b["attributes"]} == {2, 3, 4}


def test_captions_carry_attributes():
  b = make_batch(SPEC, "train", 0, 300)
  assert len(set(b["captions"])) == 300
  starts = {c.split(" ")[0] + " " + c.split(" ")[1] for c in b["captions"]}
  assert len(starts) > 10  # template variety
  for cap, attrs in zip(b["captions"], b["attributes"]):
    words = set(cap.replace(",", " ").replace(".", " ").split())
    assert attrs["background"] in words, cap
    for o in attrs["objects"]:
      assert {o["colour"], o["shape"]} <= words, cap
      assert words & set(syn._SIZE_WORDS[o["size"]]), cap
      pos = set(o["position"].split())
      pos = {"centre", "center", "middle"} if pos == {"centre"} else pos
      assert pos & words, cap
      if " " in o["position"]:  # corners name both directions
        assert set(o["position"].split()) <= words, cap
    if len(attrs["objects"]) == 2:
      assert " and " in cap


def test_images_depict_attributes():
  b = make_batch(SPEC64, "train", 0, 300)
  S = SPEC64.image_size
  yy, xx = np.mgrid[:S, :S] + 0.5
  checked, areas = 0, {}
  for img, attrs in zip(b["images"], b["attributes"]):
    mask, nearest = _chromatic(img)
    colours = [o["colour"] for o in attrs["objects"]]
    for o in attrs["objects"]:
      cx, cy = o["center"]
      near = mask & (np.hypot(xx - cx, yy - cy) < 1.25 * o["radius"])
      assert near.sum() > 0.5 * o["radius"]**2
      ci = syn.COLOUR_NAMES.index(o["colour"])
      assert np.bincount(nearest[near], minlength=8).argmax() == ci, (o, attrs)
      if colours.count(o["colour"]) > 1:
        continue
      own = mask & (nearest == ci)  # located from pixels alone, not from the attributes
      mx, my = xx[own].mean() / S, yy[own].mean() / S
      pos = o["position"]
      if "left" in pos:
        assert mx < 0.5, (pos, mx)
      if "right" in pos:
        assert mx > 0.5, (pos, mx)
      if "top" in pos:
        assert my < 0.5, (pos, my)
      if "bottom" in pos:
        assert my > 0.5, (pos, my)
      if pos == "centre":
        assert abs(mx - 0.5) < 0.15 and abs(my - 0.5) < 0.15
      if pos in ("left", "right"):
        assert abs(my - 0.5) < 0.15
      if pos in ("top", "bottom"):
        assert abs(mx - 0.5) < 0.15
      areas.setdefault((o["shape"], o["size"]), []).append(own.sum())
      centre = mask[int(cy), int(cx)]
      if o["shape"] == "ring":
        assert not centre
      if o["shape"] in ("circle", "square", "diamond", "cross", "star"):
        assert centre
      checked += 1
  assert checked > 250
  for shape in syn.SHAPES:
    assert np.median(areas[(shape, "large")]) > 1.5 * np.median(areas[(shape, "small")]), shape


def test_zeroshot_split():
  classes = zeroshot_classes(SPEC)
  assert len(classes) >= 24 and len(set(classes)) == len(classes)
  for c in classes:
    prompts = zeroshot_prompts(c)
    assert 5 <= len(prompts) <= 10 and all(c in p for p in prompts)
  assert zeroshot_prompts("red circle")[0] == "a photo of a red circle."
  assert zeroshot_prompts("orange star")[0] == "a photo of an orange star."
  images, labels = make_zeroshot(SPEC, 256, start=64)
  assert images.shape == (256, 32, 32, 3) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels, minlength=len(classes)), 256 // len(classes))
  b = make_batch(SPEC, "zeroshot", 64, 256)
  np.testing.assert_array_equal(b["images"], images)
  for img, lab, attrs in zip(images, labels, b["attributes"]):
    (o,) = attrs["objects"]
    assert attrs["label"] == lab and classes[lab] == f"{o['colour']} {o['shape']}"
    mask, nearest = _chromatic(img)
    assert syn.COLOUR_NAMES[np.bincount(nearest[mask], minlength=8).argmax()] == o["colour"]
  # other attributes vary
  assert len({a["background"] for a in b["attributes"]}) == len(syn.BACKGROUNDS)
  assert len({a["objects"][0]["position"] for a in b["attributes"]}) == 9


def _nearest_centroid(ftr, ytr, fte, yte, n):
  cent = np.stack([ftr[ytr == k].mean(0) for k in range(n)])
  d = (fte**2).sum(1)[:, None] - 2 * fte @ cent.T + (cent**2).sum(1)[None]
  return (d.argmin(1) == yte).mean()


def test_zeroshot_not_trivial_but_learnable():
  n = len(zeroshot_classes(SPEC))
  xtr, ytr = make_zeroshot(SPEC, 2000)
  xte, yte = make_zeroshot(SPEC, 2000, start=100_000)
  raw = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255  # noqa: E731
  acc_raw = _nearest_centroid(raw(xtr), ytr, raw(xte), yte, n)

  def colour_hist(x):
    mask, nearest = _chromatic(x)
    h = np.stack([(mask & (nearest == k)).sum((1, 2)) for k in range(8)], 1).astype(np.float32)
    return h / np.maximum(h.sum(1, keepdims=True), 1)

  acc_col = _nearest_centroid(colour_hist(xtr), ytr, colour_hist(xte), yte, n)
  print(f"nearest-centroid acc: raw pixels {acc_raw:.3f}, colour histogram {acc_col:.3f}, "
        f"chance {1 / n:.3f}")
  assert acc_raw < 0.9
  assert acc_col > 4 / n


def test_generation_speed_report():
  for spec in (SPEC, SPEC64):
    make_batch(spec, "train", 0, 64)
    t = time.process_time()  # CPU seconds: wall time is unreliable on a shared machine
    make_batch(spec, "train", 0, 512)
    print(f"{spec.image_size}px: {512 / (time.process_time() - t):.0f} images per CPU-second")


def test_cli_writes_files(tmp_path):
  out = tmp_path / "zs"
  assert syn.main(["--split=eval", "--num=5", f"--out={out}", "--image_size=32"]) == 0
  assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(5)] + ["labels.json"]
  meta = json.load(open(out / "labels.json"))
  assert meta["classes"][0] == "a photo of a red circle."
  assert len(meta["classes"]) == len(zeroshot_classes())
  assert meta["labels"] == {f"{i:05d}.png": i for i in range(5)}
  from PIL import Image
  images, _ = make_zeroshot(SPEC, 5)
  np.testing.assert_array_equal(np.asarray(Image.open(out / "00003.png")), images[3])
  tr = tmp_path / "tr"
  assert syn.main(["--split=train", "--num=3", f"--out={tr}", "--image_size=32", "--seed=7"]) == 0
  caps = json.load(open(tr / "captions.json"))
  assert caps == dict(
      zip([f"{i:05d}.png" for i in range(3)],
          make_batch(SyntheticSpec(32, seed=7), "train", 0, 3)["captions"]))
  assert syn.main(["--split=train", "--num=2", f"--out={out}", "--overwrite",
                   "--image_size=32"]) == 0
  assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "captions.json"]
  assert sorted(os.listdir(tmp_path)) == ["tr", "zs"]  # no temp dirs left behind


@pytest.mark.parametrize(
    "args",
    [["--split=eval", "--num=0"], ["--split=test", "--num=3"],
     ["--split=train", "--num=3", "--image_size=8"], ["--split=train", "--num=3", "NONEMPTY"]])
def test_cli_bad_args_exit_2(tmp_path, args):
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("x")
  out = full if "NONEMPTY" in args else tmp_path / "out"
  args = [a for a in args if a != "NONEMPTY"] + [f"--out={out}"]
  r = subprocess.run([sys.executable, "-m", "tinyclip_jax.data.synthetic", *args],
                     capture_output=True,
                     text=True,
                     cwd=os.path.dirname(os.path.dirname(__file__)))
  assert r.returncode == 2, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
  assert sorted(os.listdir(tmp_path)) == ["full"] and os.listdir(full) == ["keep.txt"]


# ---- the demo's generator options ------------------------------------------------------


def test_object_scale_draws_larger_objects_and_keeps_the_rest():
  base = SyntheticSpec(image_size=32, max_objects=1)
  big = SyntheticSpec(image_size=32, max_objects=1, object_scale=1.5)
  a, b = make_batch(base, "zeroshot", 0, 64), make_batch(big, "zeroshot", 0, 64)
  assert a["captions"] == b["captions"]
  for x, y in zip(a["attributes"], b["attributes"]):
    (ox,), (oy,) = x["objects"], y["objects"]
    assert oy.pop("radius") == pytest.approx(1.5 * ox.pop("radius"), rel=1e-12)
    assert x == y
  area = lambda batch: np.mean([_chromatic(im)[0].sum() for im in batch["images"]])  # noqa: E731
  assert 1.8 < area(b) / area(a) < 2.5  # radius × 1.5: area ≈ × 2.25, less what the border clips


def test_object_captions_name_size_colour_shape_only():
  spec = SyntheticSpec(image_size=32, max_objects=1, captions="objects")
  b = make_batch(spec, "train", 0, 400)
  words = {w for sizes in syn._SIZE_WORDS.values() for w in sizes}
  with_size = 0
  for cap, attrs in zip(b["captions"], b["attributes"]):
    (o,) = attrs["objects"]
    assert f"{o['colour']} {o['shape']}." in cap
    assert attrs["background"] not in cap and o["position"] not in cap
    with_size += any(f" {w} {o['colour']}" in cap for w in words)
    sizes = "|".join(syn._SIZE_WORDS[o["size"]])
    assert re.fullmatch(rf"((a photo|a picture|an image|a drawing|a rendering) of )?an? "
                        rf"(({sizes}) )?{o['colour']} {o['shape']}\.", cap), cap
  assert 150 < with_size < 250  # the size word half of the time, as the prompts have it
  # Images do not depend on the caption kind.
  full = make_batch(SyntheticSpec(image_size=32, max_objects=1), "train", 0, 8)
  np.testing.assert_array_equal(full["images"], b["images"][:8])


def test_backgrounds_and_centred():
  spec = SyntheticSpec(image_size=32, max_objects=1, backgrounds=("black", "grey"), centred=True)
  b = make_batch(spec, "train", 0, 64)
  assert {a["background"] for a in b["attributes"]} == {"black", "grey"}
  assert {a["objects"][0]["position"] for a in b["attributes"]} == {"centre"}
  assert syn.appearance({"object_scale": 1.5, "backgrounds": ("black",), "centred": True}) == {
      "object_scale": 1.5, "backgrounds": ("black",), "centred": True}
  assert syn.appearance({}) == {"object_scale": 1.0, "backgrounds": syn.BACKGROUNDS,
                                "centred": False}


@pytest.mark.parametrize("field,value,match", [
    ("object_scale", 3.0, r"object_scale must be in \[0.5, 2\]"),
    ("captions", "short", r"captions must be 'full' or 'objects'"),
    ("backgrounds", ("plaid",), r"backgrounds \('plaid',\) must be a non-empty subset"),
    ("backgrounds", (), r"backgrounds \(\) must be a non-empty subset")])
def test_bad_generator_options(field, value, match):
  with pytest.raises(ValueError, match=match):
    SyntheticSpec(image_size=32, **{field: value})


def test_zeroshot_factors_follow_the_label_rule():
  f = syn.zeroshot_factors()
  names = zeroshot_classes()
  for label, name in enumerate(names):
    colour, shape = name.split(" ")
    assert syn.COLOUR_NAMES[f["colour"][label]] == colour and syn.SHAPES[f["shape"][label]] == shape
