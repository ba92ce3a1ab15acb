"""Faults that cost users hours on real runs: relative paths, an input in which every
sample is filtered out, and processes that do not exit after their work is done.

The CLI tests run the real entry points as a user would (a relative --workdir, shards
whose captions are only in KEY.json) several times each: a run must exit 0 every time,
within a bound, with its outputs complete.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tinyclip_jax import model_io, paths
from tinyclip_jax.data import pipeline, sharded, shards
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.train import defaults, runner
from test_multihost import free_port
from test_train import ROOT, smoke_config

SIZE, CTX = 32, 16
EXIT_BOUND_S = 240  # a finished CLI run on 2 busy cores takes ~20 s; a hang never ends


def jpeg(seed: int, size: int = 40, cut: bool = False) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), np.uint8)).save(
      buf, "JPEG")
  data = buf.getvalue()
  return data[:len(data) // 2] if cut else data  # header intact, data cut


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for key, parts in samples.items():
      for ext, data in parts.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def caption_of(i: int) -> str:
  return f"a photo of thing number {i}"


def json_only_shards(folder, shards_n=2, per=24, meta=lambda i: {"caption": caption_of(i)},
                     cut=False) -> str:
  """img2dataset-style shards whose captions are in KEY.json only (no KEY.txt)."""
  os.makedirs(folder, exist_ok=True)
  for s in range(shards_n):
    write_tar(f"{folder}/{s:05d}.tar", {
        f"{s:03d}{i:04d}": {"jpg": jpeg(s * per + i, cut=cut),
                            "json": json.dumps(meta(s * per + i)).encode()}
        for i in range(per)})
  return f"{folder}/{{00000..{shards_n - 1:05d}}}.tar"


def data_cfg(pattern: str, **kw) -> ml_collections.ConfigDict:
  c = defaults.base_config().data
  c.kind, c.train, c.shards_per_window, c.shuffle_buffer = "webdataset", pattern, 2, 8
  c.update(kw)
  return c


def drain(src, batches: int) -> list[str]:
  captions = []
  try:
    for _ in range(batches):
      captions += src.next_batch()["captions"]
  finally:
    src.close()
  return captions


# -- kind 3: paths a user gives are resolved once, at the entry points ------------------


def test_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/a") == str(tmp_path / "runs" / "a")
  assert paths.resolve("gs://b/run") == "gs://b/run" and paths.resolve("") == ""
  assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
  c = smoke_config({"teacher.checkpoint": "ckpt/teacher", "data.train": "a/{0..1}.tar::gs://b/*.tar",
                    "eval.tasks": "cifar10,folder:imgs,wds:val/*.tar"})
  with c.unlocked():
    c.stages = ({"name": "one", "student": {"checkpoint": "s1"}}, {"name": "two"})
  r = paths.resolve_config(c)
  assert r.teacher.checkpoint == str(tmp_path / "ckpt" / "teacher")
  assert r.data.train == f"{tmp_path}/a/{{0..1}}.tar::gs://b/*.tar"
  assert r.eval.tasks == f"cifar10,folder:{tmp_path}/imgs,wds:{tmp_path}/val/*.tar"
  assert r.stages[0]["student"]["checkpoint"] == str(tmp_path / "s1")
  assert c.teacher.checkpoint == "ckpt/teacher"  # the caller's config is left as it was


def run_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  t0 = time.time()
  try:
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=EXIT_BOUND_S, check=False)
  except subprocess.TimeoutExpired:
    pytest.fail(f"{args[0]} did not exit within {EXIT_BOUND_S} s (work done, process hung?)")
  p.elapsed = time.time() - t0
  return p


WDS_SMOKE = ["--config.data.kind=webdataset", "--config.data.shuffle_buffer=16",
             "--config.eval.tasks=", "--config.total_steps=4", "--config.checkpoint_every=2",
             "--config.log_every=1"]


@pytest.fixture(scope="module")
def json_shards(tmp_path_factory):
  return json_only_shards(str(tmp_path_factory.mktemp("json_shards")))


# -- kind 8 (and 3, 4a through the real entry points) ---------------------------------


@pytest.mark.parametrize("attempt", range(2))
def test_training_on_shards_with_a_relative_workdir_exits_0_every_time(attempt, json_shards,
                                                                        tmp_path):
  p = run_cli(["tinyclip_jax.main", f"--config={ROOT / 'configs' / 'smoke.py'}",
               "--workdir=runs/wds", f"--config.data.train={json_shards}", *WDS_SMOKE], tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  work = tmp_path / "runs" / "wds"
  assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")] == [1, 2, 3, 4]
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
  params, config = model_io.load_model(str(work / "final"))  # the export is complete
  assert config.text.width == 32 and params
  if attempt:
    return
  p = run_cli(["tinyclip_jax.evaluate", "--checkpoint=runs/wds/final", "--output=eval.json",
               f"--dataset=wds:{json_shards}", "--batch_size=16"], tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["num_images"] == 48 and 0 <= result["image_to_text/R@1"] <= 1


def test_cache_teacher_on_shards_exits_0(json_shards, tmp_path):  # it hung every time
  p = run_cli(["tinyclip_jax.cache_teacher", f"--config={ROOT / 'configs' / 'smoke.py'}",
               "--out=cache", f"--config.data.train={json_shards}", *WDS_SMOKE], tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
  assert manifest["steps"] == 4


def test_prefetcher_close_joins_its_thread_and_closes_the_source():
  class Source:
    closed, n = False, 0

    def __next__(self):
      self.n += 1
      return {"x": np.full(2, self.n)}

    def get_state(self):
      return {"position": self.n}

    def close(self):
      self.closed = True

  src = Source()
  with pipeline.prefetch(src, 2) as batches:
    assert batches.peek()[1] == {"position": 1}
    batch, state = next(batches)  # the peeked item is not lost
    assert state == {"position": 1} and batch["x"].tolist() == [1, 1]
    assert next(batches)[1] == {"position": 2}
  assert src.closed
  assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_sharded_input_close_ends_its_iterator(json_shards):
  src = sharded.ShardedPairs(data_cfg(json_shards), SIZE, CTX, 8)
  src.next_batch()
  assert src._it is not None  # pylint: disable=protected-access
  src.close()
  assert src._it is None  # pylint: disable=protected-access


# -- kind 4a: captions in KEY.json ---------------------------------------------------


def test_captions_come_from_the_json_when_there_is_no_txt(json_shards, tmp_path):
  keys = {f"{s:03d}{i:04d}": caption_of(s * 24 + i) for s in range(2) for i in range(24)}
  src = sharded.ShardedPairs(data_cfg(json_shards), SIZE, CTX, 8)
  try:
    b = src.next_batch()
    assert b["captions"] == [keys[k] for k in b["keys"]]
  finally:
    src.close()
  # a nested field, and a .txt wins over the JSON
  write_tar(tmp_path / "n.tar", {
      "a": {"jpg": jpeg(1), "json": json.dumps({"meta": {"text": "nested one"}}).encode()},
      "b": {"jpg": jpeg(2), "txt": b"from txt", "json": b'{"meta": {"text": "unused"}}'}})
  records = list(shards.read_tar(str(tmp_path / "n.tar"), 1, 10**9, "meta/text"))
  assert [(r[0], r[2], r[3]) for r in records] == [("a", b"nested one", 0), ("b", b"from txt", 0)]
  write_tar(tmp_path / "bad.tar", {"c": {"jpg": jpeg(3), "json": b"{not json"},
                                   "d": {"jpg": jpeg(4), "json": b'{"caption": 7}'}})
  reasons = [r[3] for r in shards.read_tar(str(tmp_path / "bad.tar"), 1, 10**9, "caption")]
  assert reasons == [shards.CODE["missing_caption"]] * 2


def test_tfrecord_captions_come_from_the_json_feature(tmp_path):
  path = str(tmp_path / "x.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    feats = {"key": b"k0", "jpg": jpeg(5), "json": json.dumps({"caption": "json caption"}).encode()}
    ex = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feats.items()}))
    w.write(ex.SerializeToString())
  assert [(r[0], r[2], r[3]) for r in shards.read_tfrecord(path, 1, 10**9)] == \
      [("k0", b"json caption", 0)]


# -- kind 4b: an input with no usable sample stops early, with the counts -------------


@pytest.mark.parametrize("kind", ["missing_caption", "corrupt_image"])
def test_an_input_with_no_usable_sample_stalls_after_stall_records(kind, tmp_path):
  meta = (lambda i: {"text": "x"}) if kind == "missing_caption" else (
      lambda i: {"caption": caption_of(i)})
  pattern = json_only_shards(str(tmp_path), meta=meta, cut=kind == "corrupt_image")
  src = sharded.ShardedPairs(data_cfg(pattern, stall_records=20), SIZE, CTX, 8)
  b = src.next_batch()  # returns instead of spinning forever
  state = src.get_state()
  assert state["stalled"] == 20 and state["skipped"][kind] == 20
  assert b["images"].shape == (8, SIZE, SIZE, 3) and not b["images"].any()
  assert src.next_batch() is b  # stays stalled without reading on
  with pytest.raises(pipeline.InputStalled, match=rf"no usable sample in 20 records.*{kind} 20"):
    pipeline.InputMonitor(data_cfg(pattern, stall_records=20)).check({"hosts": [state]})
  src.close()


def test_a_long_bad_stretch_after_good_samples_also_stalls(tmp_path):
  samples = {f"g{i:03d}": {"jpg": jpeg(i), "txt": caption_of(i).encode()} for i in range(8)}
  samples.update({f"m{i:03d}": {"jpg": jpeg(i)} for i in range(60)})  # no caption at all
  write_tar(tmp_path / "00000.tar", samples)
  cfg = data_cfg(str(tmp_path / "00000.tar"), stall_records=25, shuffle_buffer=1)
  src = sharded.ShardedPairs(cfg, SIZE, CTX, 8)
  assert sorted(src.next_batch()["keys"]) == sorted(k for k in samples if k.startswith("g"))
  assert "stalled" not in src.get_state() and src.get_state()["used"] == 8
  src.next_batch()
  assert src.get_state()["stalled"] >= 25
  src.close()


def test_a_mostly_filtered_input_warns_with_the_counts(caplog):
  monitor = pipeline.InputMonitor(data_cfg("", min_usable_fraction=0.5))
  host = {"used": 400, "skipped": {"missing_caption": 900, "bad_utf8": 7}}
  with caplog.at_level("WARNING"):
    monitor.check({"hosts": [host, host]})
    monitor.check({"hosts": [host, host]})  # once per run
  warnings = [r.getMessage() for r in caplog.records if "usable" in r.getMessage()]
  assert len(warnings) == 1
  assert "800 of 2600" in warnings[0] and "missing_caption 1800" in warnings[0]
  monitor = pipeline.InputMonitor(data_cfg("", min_usable_fraction=0.25))
  monitor.check({"hosts": [host, host]})
  assert not monitor.warned


def test_training_with_no_usable_sample_exits_2_before_writing_anything(json_shards, tmp_path):
  p = run_cli(["tinyclip_jax.main", f"--config={ROOT / 'configs' / 'smoke.py'}",
               "--workdir=runs/none", f"--config.data.train={json_shards}",
               "--config.data.caption_key=text", "--config.data.stall_records=30", *WDS_SMOKE],
              tmp_path)
  assert p.returncode == 2, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no usable sample in 30 records" in errors[0]
  assert "missing_caption 30" in errors[0] and "data.caption_key='text'" in errors[0]
  assert not (tmp_path / "runs").exists()


def test_a_stall_on_one_process_stops_both_processes(json_shards, tmp_path):
  """One good shard, one whose captions are not where data.caption_key says: the
  process that reads the bad one stalls, and both stop together with exit 2."""
  folder = tmp_path / "mixed"
  folder.mkdir()
  write_tar(folder / "00000.tar", {f"g{i:03d}": {"jpg": jpeg(i), "txt": caption_of(i).encode()}
                                   for i in range(24)})
  write_tar(folder / "00001.tar", {f"m{i:03d}": {"jpg": jpeg(i), "json": b'{"other": "x"}'}
                                   for i in range(40)})
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tinyclip_jax.main", f"--config={ROOT / 'configs' / 'smoke.py'}",
       f"--workdir={tmp_path / 'run'}", f"--config.data.train={folder}/*.tar",
       "--config.data.stall_records=20", *WDS_SMOKE, f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    errs = [p.communicate(timeout=EXIT_BOUND_S)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 2, err[-3000:]
    assert "no usable sample in 20 records in a row on process(es)" in err and "of 2" in err


def test_stages_resolve_a_relative_workdir(tmp_path, monkeypatch):
  """The library entry point (a notebook's) resolves paths too: the stage folders and
  their `final/` exports are absolute, so a later stage finds the earlier one's export."""
  monkeypatch.chdir(tmp_path)
  seen = []
  monkeypatch.setattr(runner, "run_plan", seen.extend)
  config = smoke_config({"total_steps": 1})
  with config.unlocked():
    config.stages = ({"name": "a"}, {"name": "b"})
  runner.run(config, "rel/run")
  assert [p.workdir for p in seen] == [f"{tmp_path}/rel/run/0_a", f"{tmp_path}/rel/run/1_b"]
  assert seen[1].config.student.checkpoint == f"{tmp_path}/rel/run/0_a/final"


def test_evaluation_on_shards_skips_an_image_that_does_not_decode(tmp_path):
  from tinyclip_jax.eval import retrieval  # pylint: disable=import-outside-toplevel
  write_tar(tmp_path / "e.tar", {"a": {"jpg": jpeg(1), "txt": b"one"},
                                 "b": {"jpg": jpeg(2, cut=True), "txt": b"two"},
                                 "c": {"jpg": jpeg(3), "txt": b"three\nthree again"}})
  pairs = list(retrieval.wds_pairs(str(tmp_path / "e.tar")))
  assert [c for _, c in pairs] == [["one"], ["three", "three again"]]
