"""The Cloud TPU path end to end: teacher, webdataset shards and workdir on gs://, served
by a real fake-gcs-server on loopback (STORAGE_EMULATOR_HOST only), through the real
entry points (`python -m tinyclip_jax.main`, convert, evaluate, embed).

Reference: the same run on local disk. A run on gs:// killed (SIGKILL, the fault hook)
after a checkpoint and restarted logs the same losses (≤1e-6 relative), and every
logged step is in the bucket's metrics.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from tinyclip_jax import checkpoint, metrics, model_io, storage
from tinyclip_jax.data import make_shards
from tinyclip_jax.models import CLIP
from tinyclip_jax.train import defaults
from test_train import ROOT, SMOKE, smoke_config

pytestmark = pytest.mark.xdist_group("gcs")

STEPS, KILL_AT = 6, 5


def python(module: str, *args, cwd, log, cache=None, fault: str = "") -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("TINYCLIP_FAULT", None)
  if fault:
    env["TINYCLIP_FAULT"] = fault
  if cache:  # the runs of one config compile once
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with open(log, "w") as f:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=f,
                          stderr=subprocess.STDOUT, timeout=600)


def run_args(workdir, teacher, pattern):
  return [f"--config={SMOKE}", f"--workdir={workdir}", f"--config.total_steps={STEPS}",
          "--config.checkpoint_every=3", "--config.log_every=1", "--config.eval_every=3",
          f"--config.eval.tasks=wds:{pattern}",
          "--config.eval.max_examples=16", "--config.eval.batch_size=16",
          "--config.data.kind=webdataset", f"--config.data.train={pattern}",
          "--config.data.shards_per_window=2", "--config.data.shuffle_buffer=8",
          f"--config.teacher.checkpoint={teacher}"]


def save_teacher(*paths):
  cfg = defaults.build_model_config(smoke_config().teacher, "teacher")
  size, ctx = cfg.vision.image_size, cfg.text.context_length
  params = jax.tree.map(np.asarray, nn.meta.unbox(CLIP(cfg).init(
      jax.random.PRNGKey(1), np.zeros((1, size, size, 3), np.float32),
      np.zeros((1, ctx), np.int32))["params"]))
  for p in paths:
    model_io.save_model(p, params, cfg)


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
  bucket = gcs.make_bucket("tpu-run")
  base = tmp_path_factory.mktemp("gcs_e2e")
  cwd, cache = base / "cwd", base / "jax_cache"
  cwd.mkdir()
  make_shards.write_shards(str(base / "wds"), 2, 24, 32)
  storage.copy_local(str(base / "wds"), f"{bucket}/wds")
  save_teacher(str(base / "teacher"), f"{bucket}/teacher")
  local = python("tinyclip_jax.main", *run_args(base / "work", base / "teacher",
                                                 base / "wds/{00000..00001}.tar"),
                 cwd=cwd, log=base / "local.log", cache=cache)
  work = f"{bucket}/run"
  gs_args = run_args(work, f"{bucket}/teacher", f"{bucket}/wds/{{00000..00001}}.tar")
  killed = python("tinyclip_jax.main", *gs_args, cwd=cwd, log=base / "killed.log", cache=cache,
                  fault=f"kill_at_step:{KILL_AT}")
  mgr = checkpoint.manager(work, 3)
  latest = mgr.latest_step()
  mgr.close()
  after_kill = [r["step"] for r in metrics.read_jsonl(work)]
  resumed = python("tinyclip_jax.main", *gs_args, cwd=cwd, log=base / "resumed.log", cache=cache)
  return types.SimpleNamespace(bucket=bucket, base=base, cwd=cwd, cache=cache, work=work,
                               local=local, killed=killed, resumed=resumed, latest=latest,
                               after_kill=after_kill)


def log(runs, name):
  return (runs.base / f"{name}.log").read_text()


def test_killed_run_on_gcs_resumes_and_logs_the_local_losses(runs):
  assert runs.local.returncode == 0, log(runs, "local")[-3000:]
  assert runs.killed.returncode == -9, log(runs, "killed")[-3000:]
  assert runs.resumed.returncode == 0, log(runs, "resumed")[-3000:]
  # Every step up to the newest complete checkpoint was in the bucket after the kill.
  assert runs.latest == 3  # the kill hook let the async save of step 3 finish first
  assert set(range(1, 4)) <= set(runs.after_kill)
  assert f"resumed from step 3 in {runs.work}" in log(runs, "resumed")
  local = {r["step"]: r["loss"] for r in metrics.read_jsonl(runs.base / "work/metrics.jsonl")}
  rows = metrics.read_jsonl(f"{runs.work}/metrics.jsonl")
  gs = {r["step"]: r["loss"] for r in rows}
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, in order
  assert sorted(local) == sorted(gs)
  for s in local:
    assert abs(gs[s] - local[s]) <= 1e-6 * abs(local[s]), (s, gs[s], local[s])


def test_bucket_holds_the_run_and_nothing_is_written_locally(runs):
  names = storage.listdir(runs.work)
  assert {"checkpoints", "metrics", "evals", "final"} <= set(names), names
  assert any(n.startswith("events.out.tfevents.") for n in names), names
  assert storage.listdir(f"{runs.work}/evals") == ["step_00000003.json", "step_00000006.json"]
  assert storage.is_published(f"{runs.work}/final")
  assert "6" in storage.listdir(f"{runs.work}/checkpoints")
  assert os.listdir(runs.cwd) == []


def test_convert_evaluate_embed_from_gcs(runs, tmp_path):
  final = f"{runs.work}/final"
  r = python("tinyclip_jax.convert", f"--src=flax:{final}", f"--dst=hf:{tmp_path / 'hf'}",
             cwd=runs.cwd, log=tmp_path / "convert.log")
  assert r.returncode == 0, (tmp_path / "convert.log").read_text()[-3000:]
  assert (tmp_path / "hf" / "model.safetensors").is_file()
  out = f"{runs.bucket}/eval.json"
  r = python("tinyclip_jax.evaluate", f"--checkpoint={final}", f"--output={out}",
             "--num_examples=32", "--batch_size=32", cwd=runs.cwd, log=tmp_path / "eval.log")
  assert r.returncode == 0, (tmp_path / "eval.log").read_text()[-3000:]
  assert set(storage.read_json(out)) >= {"top1"}
  texts = f"{runs.bucket}/texts.txt"
  storage.write_text(texts, "a red square\na blue circle\n")
  r = python("tinyclip_jax.embed", f"--checkpoint={final}", f"--texts={texts}",
             f"--output={runs.bucket}/emb.npz", cwd=runs.cwd, log=tmp_path / "embed.log")
  assert r.returncode == 0, (tmp_path / "embed.log").read_text()[-3000:]
  import io  # pylint: disable=import-outside-toplevel
  emb = np.load(io.BytesIO(storage.read_bytes(f"{runs.bucket}/emb.npz")))
  assert emb["text_embeds"].shape[0] == 2
  assert os.listdir(runs.cwd) == []


def test_bad_gcs_input_is_one_sentence_and_exit_2_before_compiling(runs, tmp_path, monkeypatch):
  """A missing bucket through the CLI (exit 2, one `error:` line); a missing object and
  a pattern matching nothing through the same entry function, in this process."""
  from tinyclip_jax.train import prepare, runner  # pylint: disable=import-outside-toplevel
  teacher, pattern = f"{runs.bucket}/teacher", f"{runs.bucket}/wds/*.tar"
  r = python("tinyclip_jax.main", *run_args("gs://no-such-bucket/run", teacher, pattern),
             cwd=runs.cwd, log=tmp_path / "bad.log")
  text = (tmp_path / "bad.log").read_text()
  errors = [line for line in text.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, text[-3000:]
  assert "gs://no-such-bucket" in errors[0] and "compiled the train step" not in text
  monkeypatch.chdir(runs.cwd)
  compiled = []
  monkeypatch.setattr("tinyclip_jax.train.compile.compile_train_steps",
                      lambda *a, **k: compiled.append(1))
  base = {"eval.tasks": "", "data.kind": "webdataset", "data.train": pattern,
          "teacher.checkpoint": teacher}
  for override, named in (({"teacher.checkpoint": f"{runs.bucket}/no_teacher"},
                           f"{runs.bucket}/no_teacher"),
                          ({"data.train": f"{runs.bucket}/wds/*.tfrecord"},
                           f"{runs.bucket}/wds/*.tfrecord")):
    with pytest.raises((prepare.SetupError, storage.StorageError)) as e:
      runner.run(smoke_config({**base, **override}), f"{runs.bucket}/bad")
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not compiled and os.listdir(runs.cwd) == []
  assert storage.listdir(f"{runs.bucket}/bad") == []


def test_teacher_cache_on_gcs_and_a_run_reading_it(runs, tmp_path, monkeypatch):
  """`cache_teacher --out=gs://…`, then a run reading it; a cache writer killed right
  before its manifest (the commit marker) leaves a cache that is refused."""
  from tinyclip_jax.train import runner  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(runs.cwd)
  out = f"{runs.bucket}/cache"
  r = python("tinyclip_jax.cache_teacher", f"--config={SMOKE}", f"--out={out}", "--steps=2",
             "--chunk=1", "--dtype=float32", f"--config.teacher.checkpoint={runs.bucket}/teacher",
             "--config.eval.tasks=", cwd=runs.cwd, log=tmp_path / "cache.log")
  assert r.returncode == 0, (tmp_path / "cache.log").read_text()[-3000:]
  assert storage.listdir(out) == ["cache.json", "p000-000000.safetensors",
                                  "p000-000001.safetensors"]
  c = smoke_config({"teacher.checkpoint": f"{runs.bucket}/teacher", "eval.tasks": "",
                    "teacher.cache": out, "total_steps": 2, "log_every": 1})
  work = f"{runs.bucket}/cache_run"
  runner.run(c, work)
  assert [r["step"] for r in metrics.read_jsonl(work)] == [1, 2]
  assert storage.is_published(f"{work}/final")
  killed = f"{runs.bucket}/cache_killed"
  script = ("import numpy as np; from tinyclip_jax.data import teacher_cache as t; "
            f"w = t.Writer({killed!r}, chunk=1, dtype='float32'); "
            "w.add(np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)); "
            "w.close({'steps': 1})")
  r = subprocess.run([sys.executable, "-c", script], cwd=runs.cwd, timeout=300, env=dict(
      os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
      TINYCLIP_FAULT="kill_in_write:teacher_cache"), capture_output=True, text=True)
  assert r.returncode == -9, r.stderr[-3000:]
  assert storage.listdir(killed) == ["p000-000000.safetensors"]  # rows, but no manifest
  with pytest.raises(Exception, match="cache.json is missing"):
    runner.run(smoke_config({"teacher.checkpoint": f"{runs.bucket}/teacher", "eval.tasks": "",
                           "teacher.cache": killed, "total_steps": 2}), f"{runs.bucket}/x")
  assert os.listdir(runs.cwd) == []


def test_auto_inheritance_stages_on_gcs(runs, monkeypatch):
  """A masked → pruned stage on gs://: structure files, the stage marker and the export
  land in the bucket, and a second call skips the finished stage."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import runner  # pylint: disable=import-outside-toplevel
  from test_auto_inherit import auto_config  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(runs.cwd)
  c = auto_config()
  c.total_steps, c.masks.prune_step, c.masks.sparsity_warmup = 4, 2, 1
  c.stages = (ml_collections.ConfigDict({"name": "auto"}),)
  work = f"{runs.bucket}/staged"
  runner.run(c, work)
  assert storage.listdir(work) == ["0_auto"]
  assert storage.read_json(f"{work}/0_auto/stage_done.json")["step"] == 4
  assert storage.is_published(f"{work}/0_auto/final")
  again = runner.run(c, work)  # complete: skipped, read back from its marker
  assert again["stages"][0]["name"] == "auto"
  structure = storage.listdir(f"{work}/0_auto/structure")
  assert "pruned_00000002.json" in structure and "pruned_00000002.png" in structure
  assert storage.read_bytes(f"{work}/0_auto/structure/pruned_00000002.png")[:4] == b"\x89PNG"
  assert os.listdir(runs.cwd) == []


def test_per_sample_cache_on_gcs(runs, monkeypatch):
  """A per-sample cache built from shards on gs:// into gs://, and read back by the
  sharded input from there: each row equals the sidecar's row (fetched through the
  storage layer) at the epoch's draw."""
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import cache_teacher  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import sample_cache, sharded  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import teacher_cache  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(runs.cwd)
  out = f"{runs.bucket}/samples_k2"
  c = smoke_config({"teacher.checkpoint": f"{runs.bucket}/teacher", "eval.tasks": "",
                    "data.kind": "webdataset", "data.train": f"{runs.bucket}/wds/*.tar"})
  manifest = cache_teacher.build_samples(c, out, 2, dtype="float32")
  assert storage.listdir(f"{out}/shards") == ["00000.tar.safetensors", "00001.tar.safetensors"]
  assert sum(v["cached"] for v in manifest["shards"].values()) == 48
  side = {}
  for name in ("00000.tar", "00001.tar"):
    arrays = load(storage.read_bytes(f"{out}/{sample_cache.sidecar_name(name)}"))
    for i, h in enumerate(arrays["key_hash"].tolist()):
      side[h] = (arrays["image.0"][i], arrays["text.0"][i])
  src = sharded.ShardedPairs(c.data, 32, 32, 8, cache=(out, manifest))
  try:
    b = src.next_batch()
  finally:
    src.close()
  for key, image, text in zip(b["keys"], b["teacher_image"], b["teacher_text"]):
    h = sample_cache.key_hash(key)
    want_image, want_text = side[h]
    np.testing.assert_array_equal(image, teacher_cache.decode(
        want_image[sample_cache.draw(0, 0, h, 2)]))
    np.testing.assert_array_equal(text, want_text)
