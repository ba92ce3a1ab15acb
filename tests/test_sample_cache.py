"""Per-sample teacher cache (cache_teacher --augmentations=K, data/sample_cache.py).

References: the crops re-made here with PIL from the stored box (decode, crop,
bicubic resize, CLIP mean/std, as torchvision makes a crop) and embedded by the
teacher here; the online-teacher run of the same key-derived crops
(data.augmentations=1), which a float32 cache with K=1 must equal to 1e-6.
"""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from tinyclip_jax import cache_teacher, preprocess
from tinyclip_jax.data import make_shards, sample_cache, sharded, shards
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.train import defaults, prepare, runner
from test_train import mesh_on, smoke_config

pytestmark = pytest.mark.xdist_group("sample_cache")

PER_SHARD = 24
SCALE = 0.4  # crop_scale_min: with 0.9-1.0 the K crops would be near-duplicates


def config(data_dir, ensemble: bool = False, **overrides):
  base = {"total_steps": 3, "log_every": 1, "checkpoint_every": 3, "eval.tasks": "",
          "batch_size": 16, "data.kind": "webdataset", "data.train": f"{data_dir}/*.tar",
          "data.crop_scale_min": SCALE, "data.shuffle_buffer": 64}
  c = smoke_config({**base, **overrides})
  if ensemble:  # a second, random teacher of another width (24) and τ
    m = defaults.ensemble_member(scale=30.0)
    m.custom.update({"embed_dim": 24, "image_size": 32, "patch_size": 8, "vision_width": 48,
                     "vision_layers": 1, "text_width": 48, "text_layers": 1, "head_dim": 24,
                     "context_length": 32})
    c.teacher.ensemble.b = m
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory, compile_cache):
  root = tmp_path_factory.mktemp("samples")
  keys = make_shards.write_shards(str(root / "shards"), 3, PER_SHARD, image_size=40)
  k2 = cache_teacher.build_samples(config(root / "shards"), str(root / "k2"), 2)
  # K=1, float32, of a two-teacher ensemble (the cache stores every teacher's rows).
  k1 = cache_teacher.build_samples(config(root / "shards", ensemble=True), str(root / "k1"), 1,
                                   dtype="float32", batch=16)
  return root, keys, k2, k1


def _sidecar(path, shard):
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  return load((path / sample_cache.sidecar_name(str(shard))).read_bytes())


def test_manifest_and_sidecars(built):
  root, keys, k2, _ = built
  assert k2["augment"]["augmentations"] == 2 and k2["augment"]["crop_scale_min"] == SCALE
  assert sorted(k2["shards"]) == ["00000.tar", "00001.tar", "00002.tar"]
  assert all(v == {"records": PER_SHARD, "cached": PER_SHARD} for v in k2["shards"].values())
  assert k2["teachers"][0]["name"] == "teacher" and len(k2["teachers"][0]["digest"]) == 64
  assert k2["build"]["images"] == 3 * PER_SHARD * 2 and k2["build"]["images_per_s"] > 0
  side = _sidecar(root / "k2", next(iter(keys)))
  assert side["box"].shape == (PER_SHARD, 2, 4) and side["image.0"].dtype == np.uint16
  # The two crops of a sample differ (scale 0.4-1.0), so K=2 stores two views.
  assert (side["box"][:, 0] != side["box"][:, 1]).any(axis=1).mean() > 0.9


def _pil_crop(encoded: bytes, box, size: int) -> np.ndarray:
  top, left, h, w = (int(v) for v in box)
  image = Image.open(io.BytesIO(encoded)).convert("RGB").crop((left, top, left + w, top + h))
  pixels = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255.0
  return (pixels - np.float32(preprocess.CLIP_MEAN)) / np.float32(preprocess.CLIP_STD)


def test_stored_embeddings_are_the_teachers_on_the_stored_crops(built):
  """float32 cache (K=1) of an ensemble: each row = each teacher's embedding of the crop
  PIL makes from the stored box, and of the caption."""
  from tinyclip_jax import tokenizer  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP, l2_normalize  # pylint: disable=import-outside-toplevel
  root, keys, _, _ = built
  shard = sorted(keys)[1]
  records = list(shards.read_tar(shard, 16, 10**8))[:6]
  side = _sidecar(root / "k1", shard)
  c = config(root / "shards", ensemble=True)
  setup, _ = prepare.build(c, restoring=True)
  size = setup.student_config.vision.image_size
  crops = np.stack([_pil_crop(r[1], side["box"][i, 0], size) for i, r in enumerate(records)])
  tokens = tokenizer.tokenize([r[2].decode() for r in records],
                              setup.student_config.text.context_length)
  assert [sample_cache.key_hash(r[0]) for r in records] == side["key_hash"][:6].tolist()
  assert [t["name"] for t in built[3]["teachers"]] == ["teacher", "b"]
  for m, (cfg, params) in enumerate(zip(setup.teacher_configs, setup.teacher_params)):
    model = CLIP(cfg)
    image = l2_normalize(model.apply({"params": params}, crops, method=CLIP.encode_image))
    text = l2_normalize(model.apply({"params": params}, tokens, method=CLIP.encode_text))
    assert side[f"image.{m}"].shape == (PER_SHARD, 1, cfg.embed_dim)
    np.testing.assert_allclose(side[f"image.{m}"][:6, 0], np.asarray(image), rtol=0, atol=1e-6)
    np.testing.assert_allclose(side[f"text.{m}"][:6], np.asarray(text), rtol=0, atol=1e-6)


def test_cached_run_equals_the_online_run_of_the_same_crops(built, tmp_path, monkeypatch):
  """K=1, float32, a two-teacher ensemble: every step's loss equals the run that
  computes both teachers (with the same key-derived crops, data.augmentations=1) to
  1e-6 relative. The cached image
  embeddings differ from the step's own teacher forward by 1-2 float32 ulps (2.4e-7:
  XLA compiles the image tower alone differently from inside the step; text: equal),
  and the smoke config's first updates (gradient norm ~300 clipped to 5, lr 1e-3)
  carry that to 3e-7 of the loss by step 3."""
  import jax  # pylint: disable=import-outside-toplevel
  mesh_on(monkeypatch, jax.devices()[:1])  # one device: the same values, half the compile
  root = built[0]
  logs = []
  for name, extra in (("online", {"data.augmentations": 1}),
                      ("cached", {"teacher.cache": str(root / "k1")})):
    runner.run(config(root / "shards", ensemble=True, **extra), str(tmp_path / name))
    logs.append(read_jsonl(tmp_path / name / "metrics.jsonl"))
  online, cached = ([r["loss"] for r in log if "loss" in r] for log in logs)
  assert len(online) == 3
  np.testing.assert_allclose(cached, online, rtol=1e-6, atol=0)


def _epoch(root, cache, batch, process_index=0, process_count=1, window=2):
  """{key: (teacher image, teacher text, image)} of the first epoch on one process."""
  c = config(root / "shards", **{"data.shards_per_window": window})
  manifest = sample_cache.teacher_cache.load_manifest(str(root / cache))
  src = sharded.ShardedPairs(c.data, 32, 32, batch, process_index, process_count,
                             cache=(str(root / cache), manifest))
  mine = len(shards.host_units(src.units, 0, 0, process_index, process_count)) * PER_SHARD
  out = {}
  try:
    while len(out) < mine:  # each sample once per epoch: first sightings are epoch 0's
      b = src.next_batch()
      for i, key in enumerate(b["keys"]):
        out.setdefault(key, (b["teacher_image"][i], b["teacher_text"][i], b["images"][i]))
    return out, src.get_state()
  finally:
    src.close()


def test_any_batch_size_and_process_count_read_the_same_rows(built):
  """The same sample carries the same crop and embeddings whoever reads it: one process
  at batch 8, or two processes at batch 12; one of the K rows, drawn per epoch."""
  root = built[0]
  one, _ = _epoch(root, "k2", 8)
  two = {**_epoch(root, "k2", 12, 0, 2)[0], **_epoch(root, "k2", 12, 1, 2)[0]}
  common = sorted(one)
  assert sorted(two) == common and len(common) == 3 * PER_SHARD
  for key in common:
    for a, b in zip(one[key], two[key]):
      np.testing.assert_array_equal(a, b)
  side = {sample_cache.key_hash(k): (i, s) for s in range(3)
          for i, k in enumerate(built[1][str(root / "shards" / f"{s:05d}.tar")])}
  draws = set()
  for key in common:
    row, s = side[sample_cache.key_hash(key)]
    arrays = _sidecar(root / "k2", root / "shards" / f"{s:05d}.tar")
    a = sample_cache.draw(0, 0, sample_cache.key_hash(key), 2)
    draws.add(a)
    np.testing.assert_array_equal(
        one[key][0], sample_cache.teacher_cache.decode(arrays["image.0"][row, a]))
  assert draws == {0, 1}


def test_resume_is_exact(built):
  root = built[0]
  c = config(root / "shards")
  manifest = sample_cache.teacher_cache.load_manifest(str(root / "k2"))
  make = lambda: sharded.ShardedPairs(c.data, 32, 32, 8, cache=(str(root / "k2"), manifest))
  a = make()
  try:
    for _ in range(4):
      a.next_batch()
    state = a.get_state()
    want = a.next_batch()
  finally:
    a.close()
  b = make()
  try:
    b.set_state(state)
    got = b.next_batch()
  finally:
    b.close()
  assert got["keys"] == want["keys"]
  for k in ("images", "teacher_image", "teacher_text"):
    np.testing.assert_array_equal(got[k], want[k])


def test_samples_missing_from_the_cache_are_counted_and_skipped(built, tmp_path):
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  root = built[0]
  part = tmp_path / "part"
  (part / "shards").mkdir(parents=True)
  (part / "cache.json").write_bytes((root / "k2" / "cache.json").read_bytes())
  for s in range(3):
    arrays = _sidecar(root / "k2", root / "shards" / f"{s:05d}.tar")
    if s == 1:  # the first 5 samples of shard 1 were never cached
      arrays = {k: v[5:] for k, v in arrays.items()}
    name = sample_cache.sidecar_name(str(root / "shards" / f"{s:05d}.tar"))
    (part / name).write_bytes(save(arrays))
  c = config(root / "shards")
  manifest = sample_cache.teacher_cache.load_manifest(str(part))
  src = sharded.ShardedPairs(c.data, 32, 32, 8, cache=(str(part), manifest))
  seen = []
  try:
    while src.state["epoch"] == 0 and len(seen) < 3 * PER_SHARD - 5:
      seen += src.next_batch()["keys"]
  finally:
    src.close()
  missing = set(built[1][str(root / "shards" / "00001.tar")][:5])
  assert not missing & set(seen)
  assert src.get_state()["skipped"]["not_cached"] == 5


def test_reader_memory_does_not_grow_with_the_number_of_shards(tmp_path, monkeypatch):
  """Sidecars are streamed a window at a time: reading 12 shards holds as many of them
  at once, and peaks at as many bytes, as reading 3 does (a map of the whole dataset
  would hold 4x the sidecars)."""
  import gc  # pylint: disable=import-outside-toplevel
  import weakref  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  width, k, per = 1024, 8, 16
  keys = make_shards.write_shards(str(tmp_path / "shards"), 12, per, image_size=20)
  (tmp_path / "cache" / "shards").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for shard, names in keys.items():
    n = len(names)
    arrays = {"key_hash": np.array([sample_cache.key_hash(x) for x in names], np.int64),
              "ok": np.ones(n, np.uint8), "box": np.zeros((n, k, 4), np.int32),
              "image.0": rng.standard_normal((n, k, width), np.float32),
              "text.0": rng.standard_normal((n, width), np.float32)}
    arrays["box"][..., 2:] = 20
    (tmp_path / "cache" / sample_cache.sidecar_name(shard)).write_bytes(save(arrays))
  manifest = {"augment": {"augmentations": k}, "teachers": [{"embed_dim": width}]}
  live, most = weakref.WeakSet(), [0]
  read = sample_cache.Sidecar.read.__func__

  def counted(cls, path, members):
    side = read(cls, path, members)
    live.add(side)
    most[0] = max(most[0], len(live))
    return side
  monkeypatch.setattr(sample_cache.Sidecar, "read", classmethod(counted))

  def peak(count):
    c = config(tmp_path / "shards", **{"data.shards_per_window": 3, "data.prefetch": 0,
                                       "data.shuffle_buffer": 16})
    src = sharded.ShardedPairs(c.data, 16, 16, 8, cache=(str(tmp_path / "cache"), manifest))
    src.units = sorted(keys)[:count]
    gc.collect()
    most[0] = 0
    tracemalloc.start()
    try:
      for _ in range(count * per // 8):  # one epoch
        src.next_batch()
      return tracemalloc.get_traced_memory()[1], most[0]
    finally:
      # Readers first: stopping tracemalloc while tf.data's threads still allocate in
      # Python (the shard readers run there) can crash CPython 3.11.
      src.close()
      tracemalloc.stop()

  peak(3)  # the first reader in a process also traces tf.data's functions
  (small, held_small), (large, held_large) = peak(3), peak(12)
  sidecar = per * k * width * 4
  assert held_large <= held_small + 1, (held_small, held_large)
  assert large < small + 2 * sidecar, (small, large, sidecar)


@pytest.mark.parametrize("overrides,words", [
    ({"data.crop_scale_min": 0.5}, ["data.crop_scale_min = 0.4", "sets 0.5"]),
    ({"data.augmentations": 3}, ["data.augmentations = 2", "sets 3"]),
    ({"teacher.custom.text_layers": 3}, ["teacher(s) teacher (", "teacher.config.text.heads (cache: [2, 2, 2, 2]; this run: [2, 2, 2])"]),
    ({"data.train": "EXTRA"}, ["has no embeddings of shard", "00003.tar"]),
    ({"teacher.cache": "NOT_A_CACHE"}, ["holds no complete cache"]),
    ({"teacher.cache": "CORRUPT_JSON"}, ["cache.json is not readable JSON", "rebuild"]),
    ({"teacher.cache": "LIST_JSON"}, ["cache.json holds a list, not a cache manifest"]),
])
def test_a_cache_that_does_not_fit_is_refused_before_compiling(built, tmp_path, overrides, words):
  root = built[0]
  overrides = dict({"teacher.cache": str(root / "k2")}, **overrides)
  if overrides.get("data.train") == "EXTRA":  # a shard the cache was not built over
    make_shards.write_shards(str(tmp_path / "more"), 4, 4, image_size=40)
    overrides["data.train"] = f"{root}/shards/*.tar::{tmp_path}/more/00003.tar"
  if overrides["teacher.cache"] == "NOT_A_CACHE":
    (tmp_path / "empty").mkdir()
    overrides["teacher.cache"] = str(tmp_path / "empty")
  if overrides["teacher.cache"] in ("CORRUPT_JSON", "LIST_JSON"):  # a half-copied manifest
    (tmp_path / "bad").mkdir()
    text = '{"format": 2, "aug' if overrides["teacher.cache"] == "CORRUPT_JSON" else "[1]"
    (tmp_path / "bad" / sample_cache.MANIFEST).write_text(text)
    overrides["teacher.cache"] = str(tmp_path / "bad")
  with pytest.raises(prepare.SetupError) as e:
    runner.run(config(root / "shards", **overrides), str(tmp_path / "run"))
  for w in words:
    assert w in str(e.value), str(e.value)
  assert "\n" not in str(e.value)
  assert not list((tmp_path / "run").glob("**/checkpoints/*"))


def test_builder_refuses_bad_requests(built, tmp_path):
  root = built[0]
  for k, kw, words in ((0, {}, "--augmentations=0"),
                       (1, {"data.kind": "synthetic"}, "needs webdataset or tfrecord"),
                       (1, {}, "already holds a complete teacher cache"),
                       (1, {}, "is a file, not a folder")):
    out = root / "k2" if "complete" in words else tmp_path / "c"
    if "file" in words:  # --out naming a file: refused in one sentence, the file kept
      out = tmp_path / "f"
      out.write_text("mine")
    with pytest.raises(prepare.SetupError, match=words.replace("=", "=")):
      cache_teacher.build_samples(config(root / "shards", **kw), str(out), k)
    assert not (tmp_path / "c").exists()
  assert (tmp_path / "f").read_text() == "mine"
  make_shards.write_shards(str(tmp_path / "other"), 1, 2, image_size=40)
  with pytest.raises(prepare.SetupError, match=r"two shards named '00000.tar' \(.*shards/"
                     r"00000.tar and .*other/00000.tar\)"):
    cache_teacher.build_samples(
        config(root / "shards", **{"data.train": f"{root}/shards/*.tar::{tmp_path}/other/*.tar"}),
        str(tmp_path / "c"), 1)
  assert not (tmp_path / "c").exists()
  with pytest.raises(prepare.SetupError, match="per-step cache holds one teacher"):
    cache_teacher.build(config(root / "shards", ensemble=True), str(tmp_path / "c"))


def test_cli_exit_code(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from test_train import ROOT, SMOKE  # pylint: disable=import-outside-toplevel
  p = subprocess.run([sys.executable, "-m", "tinyclip_jax.cache_teacher", f"--config={SMOKE}",
                      "--augmentations=0", f"--out={tmp_path / 'c'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "error: --augmentations=0" in p.stderr
  assert not (tmp_path / "c").exists()
  # A flag value that is not a number: one sentence and exit 2 too, not absl's exit 1.
  p = subprocess.run([sys.executable, "-m", "tinyclip_jax.cache_teacher", f"--config={SMOKE}",
                      "--augmentations=x", f"--out={tmp_path / 'c'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "error: flag --augmentations=x" in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "c").exists()


def test_an_unreadable_sidecar_skips_its_samples_as_not_cached(tmp_path):
  # A truncated or corrupt sidecar must not end the shard's reader (tf.data would drop
  # the shard uncounted): its records are counted as not_cached instead.
  hashes = np.array([sample_cache.key_hash(k) for k in ("a", "b")], np.int64)
  sample_cache.write_sidecar(str(tmp_path), "00000.tar", hashes, np.ones(2, np.uint8),
                             np.zeros((2, 1, 4), np.int32), [np.ones((2, 1, 8), np.float32)],
                             [np.ones((2, 8), np.float32)], "float32")
  path = tmp_path / sample_cache.sidecar_name("00000.tar")
  whole = path.read_bytes()
  assert sample_cache.Sidecar.read(str(path), 1).take(int(hashes[0])) == 0
  for blob in (whole[:100], b"\xff" * len(whole), b""):
    path.write_bytes(blob)
    sidecar = sample_cache.Sidecar.read(str(path), 1)
    chunk = (["a", "b"], [b"", b""], ["x", "y"], [0, 0])
    (_, _, _, reasons, *_), = sample_cache.annotate(
        iter([chunk]), epoch=0, seed=0, k=1, sidecar=sidecar, widths=[8], not_cached=99)
    assert list(reasons) == [99, 99]


def test_an_unfinished_build_resumes_only_with_its_own_settings(tmp_path):
  # _start writes build.json (what the build is of); a rerun with the same settings
  # resumes, one with other crops is refused naming the field and both values.
  out = str(tmp_path / "c")
  manifest = {"format": sample_cache.FORMAT,
              "augment": {"crop_scale_min": 0.9, "augmentations": 2}}
  assert cache_teacher._start(out, manifest) == {}  # pylint: disable=protected-access
  assert cache_teacher._start(out, manifest) == {}  # pylint: disable=protected-access
  other = {**manifest, "augment": {"crop_scale_min": 0.5, "augmentations": 2}}
  with pytest.raises(prepare.SetupError,
                     match=r"unfinished build of another cache: augment.crop_scale_min "
                           r"\(started with: 0.9; this run: 0.5\); rerun with its settings"):
    cache_teacher._start(out, other)  # pylint: disable=protected-access
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "x").write_text("")
  with pytest.raises(prepare.SetupError, match="is not an unfinished build of this cache"):
    cache_teacher._start(str(tmp_path / "d"), manifest)  # pylint: disable=protected-access
