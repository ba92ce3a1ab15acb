"""Teacher-embedding cache (python -m tinyclip_jax.cache_teacher, teacher.cache=PATH).

Reference: the same run computing the teacher forward itself. A float32 cache
replays it exactly (same batches, crops and embeddings: losses equal to 1e-6), also
when the builder cut the tokens to text buckets and the run did not; the
default bfloat16 cache rounds each unit-vector component by ≤ 2⁻⁹ relative, which
moves τ=50 logits by ~0.1 and the loss by ~0.2% (measured 2.0e-3 at step 1).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tinyclip_jax import cache_teacher
from tinyclip_jax.data import teacher_cache
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.train import compile as compile_lib, loop, prepare, runner
from test_train import ROOT, SMOKE, smoke_config

pytestmark = pytest.mark.xdist_group("teacher_cache")

STEPS = 4


def config(**overrides):
  base = {"total_steps": STEPS, "log_every": 1, "checkpoint_every": STEPS, "eval.tasks": "",
          "mesh.data": -1}
  return smoke_config({**base, **overrides})


@pytest.fixture(scope="module")
def cache(tmp_path_factory, compile_cache):  # every run here initialises the same teacher
  path = tmp_path_factory.mktemp("cache") / "c"
  manifest = cache_teacher.build(config(), str(path), chunk=3)  # 2 files: 3 steps + 1
  return path, manifest


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
  exact = tmp_path_factory.mktemp("cache32") / "c"
  # Built with text buckets: the builder cuts the tokens as training does (step 3's
  # longest caption needs 28 of the 32 positions, the others more), and the run, at
  # full length, must agree.
  cache_teacher.build(config(text_buckets=(28, 32)), str(exact), dtype="float32")
  out = []
  for name, path in (("plain", ""), ("bf16", cache[0]), ("f32", exact)):
    work = tmp_path_factory.mktemp(name)
    runner.run(config(**{"teacher.cache": str(path)}), str(work))
    out.append(read_jsonl(work / "metrics.jsonl"))
  return out


def test_cache_layout_and_manifest(cache):
  path, manifest = cache
  assert sorted(p.name for p in path.iterdir()) == [
      "cache.json", "p000-000000.safetensors", "p000-000001.safetensors"]
  assert manifest["steps"] == STEPS and manifest["batch_size"] == 16
  assert manifest["data"]["seed"] == 0  # the augmentation seed travels with the cache
  assert json.loads((path / "cache.json").read_text()) == manifest


def test_cached_embeddings_are_the_teacher_forward_in_bfloat16(cache):
  """Step 1's cached rows against the teacher run on step 1's batch here."""
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP  # pylint: disable=import-outside-toplevel
  path, manifest = cache
  c = config()
  setup, _ = prepare.build(c, restoring=True)
  cfg = setup.student_config
  batch = next(pipeline.make_train_input(c.data, cfg.vision.image_size, cfg.text.context_length,
                                         c.batch_size))
  out = jax.jit(lambda p: CLIP(setup.teacher_config).apply(
      {"params": p}, batch["images"], batch["tokens"]))(setup.teacher_params)
  image, text = teacher_cache.Reader(str(path), manifest).step(1)
  np.testing.assert_allclose(image, np.asarray(out["image_embeds"]), atol=2 ** -8, rtol=0)
  np.testing.assert_allclose(text, np.asarray(out["text_embeds"]), atol=2 ** -8, rtol=0)
  assert np.abs(image - np.asarray(out["image_embeds"])).max() > 0  # really bfloat16


def test_losses_with_and_without_the_cache_agree(runs):
  plain, bf16, f32 = runs
  assert [r["step"] for r in f32] == [r["step"] for r in bf16] == list(range(1, STEPS + 1))
  for a, b, c in zip(plain, bf16, f32):
    for key in ("loss", "affinity_i2t", "affinity_t2i", "grad_norm"):
      np.testing.assert_allclose(c[key], a[key], rtol=1e-6, err_msg=f"f32 step {a['step']}")
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=5e-3, err_msg=f"bf16 step {a['step']}")


@pytest.mark.parametrize("overrides, message", [
    ({"teacher.custom.vision_width": 96}, "teacher.config"),   # another teacher
    ({"seed": 5}, "teacher.digest"),                             # same shapes, other weights
    ({"data.seed": 3}, "data.seed"),                             # other crops / order
    ({"batch_size": 32}, "batch_size"),
    ({"total_steps": STEPS + 1}, f"holds {STEPS} steps but the run needs {STEPS + 1}"),
])
def test_a_cache_for_another_run_is_refused_naming_both(cache, overrides, message):
  c = config(**{"teacher.cache": str(cache[0]), **overrides})
  with pytest.raises(prepare.SetupError, match=message) as e:
    prepare.build(c, restoring=True)
  assert "teacher.cache" in str(e.value)


def test_a_cache_from_another_image_decoder_is_refused_naming_both(cache, tmp_path):
  """Caches from before the decoding rule was versioned (tf.io.decode_image) hold no
  decode_version; one from another rule holds another number."""
  from tinyclip_jax.data import decode  # pylint: disable=import-outside-toplevel
  assert cache[1]["decode_version"] == decode.DECODE_VERSION
  old = tmp_path / "old"
  shutil.copytree(cache[0], old)
  manifest = json.loads((old / "cache.json").read_text())
  del manifest["decode_version"]
  (old / "cache.json").write_text(json.dumps(manifest))
  with pytest.raises(prepare.SetupError) as e:
    prepare.build(config(**{"teacher.cache": str(old)}), restoring=True)
  assert str(e.value) == (
      f"teacher.cache {old} was built from images decoded by rule version 1 "
      "(tf.io.decode_image; not recorded then) but this run decodes them by rule version "
      f"{decode.DECODE_VERSION} (tinyclip_jax/data/decode.py); rebuild the cache.")
  expected = dict(manifest, decode_version=decode.DECODE_VERSION)
  with pytest.raises(teacher_cache.CacheError,
                     match=f"rule version 7 but this run decodes them by rule version "
                     f"{decode.DECODE_VERSION} "):
    teacher_cache.check(dict(manifest, decode_version=7), expected, STEPS, str(old))
  teacher_cache.check(dict(manifest, decode_version=decode.DECODE_VERSION), expected, STEPS,
                      str(old))


def test_missing_cache_and_cli_errors(tmp_path, cache):
  with pytest.raises(prepare.SetupError, match="holds no complete cache"):
    prepare.build(config(**{"teacher.cache": str(tmp_path / "none")}), restoring=True)
  r = subprocess.run([sys.executable, "-m", "tinyclip_jax.cache_teacher", f"--config={SMOKE}",
                      f"--out={cache[0]}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "is not empty" in errors[0]
