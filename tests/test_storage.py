"""tinyclip_jax.storage against a real GCS-API server (fake-gcs-server on loopback),
reached through STORAGE_EMULATOR_HOST alone; faults through a loopback proxy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tinyclip_jax import metrics, model_io, storage, workdir
from tinyclip_jax.models import CLIPConfig
from gcs_fixtures import FaultyProxy, use_endpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket(gcs):
  return gcs.make_bucket("store")


def test_write_read_list_remove(bucket):
  base = f"{bucket}/basic"
  storage.write_text(f"{base}/a.txt", "one")
  storage.write_json(f"{base}/sub/b.json", {"x": 1})
  storage.write_bytes(f"{base}/a.txt", b"two")  # replaces whole
  assert storage.read_text(f"{base}/a.txt") == "two"
  assert storage.read_json(f"{base}/sub/b.json") == {"x": 1}
  assert storage.listdir(base) == ["a.txt", "sub"]
  assert storage.listdir(f"{base}/none") == []
  assert storage.glob(f"{base}/*.txt") == [f"{base}/a.txt"]
  assert storage.exists(f"{base}/sub/b.json") and not storage.exists(f"{base}/c")
  with storage.open_read(f"{base}/a.txt") as f:
    assert f.read() == b"two"
  storage.remove(base)
  assert storage.listdir(base) == [] and not storage.exists(f"{base}/a.txt")


def test_missing_bucket_and_object_are_one_sentence(bucket):
  with pytest.raises(storage.StorageError) as e:
    storage.read_bytes(f"{bucket}/nothing/here")
  assert str(e.value).startswith(f"{bucket}/nothing/here does not exist")
  with pytest.raises(storage.StorageError) as e:
    storage.glob("gs://no-such-bucket/*.tar")
  assert "gs://no-such-bucket" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(storage.StorageError) as e:
    storage.check_writable("gs://no-such-bucket/run")
  assert "gs://no-such-bucket" in str(e.value)


def test_publish_marks_a_folder_complete(bucket):
  folder = f"{bucket}/pub"
  storage.write_text(f"{folder}/part", "x")
  assert not storage.is_published(folder)
  storage.publish(folder)
  assert storage.is_published(folder)
  storage.unpublish(folder)
  assert not storage.is_published(folder) and storage.exists(f"{folder}/part")


def _tiny_model():
  from tinyclip_jax.models.config import TextConfig, VisionConfig  # pylint: disable=import-outside-toplevel
  return CLIPConfig(embed_dim=8,
                    vision=VisionConfig(width=16, heads=(1,), mlp=(32,), head_dim=16,
                                        image_size=16, patch_size=8),
                    text=TextConfig(width=16, heads=(1,), mlp=(32,), head_dim=16, vocab_size=64,
                                    context_length=8))


def test_model_checkpoint_roundtrip_on_gcs_and_kill_mid_export(bucket, tmp_path):
  """orbax (tensorstore) writes the params into the bucket; a writer killed between
  the params and the commit marker leaves a folder that load_model refuses."""
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP  # pylint: disable=import-outside-toplevel
  cfg = _tiny_model()
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  params = jax.tree.map(np.asarray, nn.meta.unbox(CLIP(cfg).init(
      jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
      np.zeros((1, 8), np.int32))["params"]))
  path = f"{bucket}/model"
  model_io.save_model(path, params, cfg)
  got, got_cfg = model_io.load_model(path)
  assert got_cfg == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  # The same export killed after its params (the fault hook SIGKILLs the child).
  script = (f"import json, numpy as np, jax; from tinyclip_jax import model_io; "
            f"from tinyclip_jax.models import CLIP, CLIPConfig; "
            f"cfg = CLIPConfig.from_json({cfg.to_json()!r}); "
            f"p = CLIP(cfg).init(jax.random.PRNGKey(0), np.zeros((1,16,16,3)), "
            f"np.zeros((1,8),np.int32))['params']; import flax.linen as nn; p = nn.meta.unbox(p); "
            f"model_io.save_model({path!r}, jax.tree.map(np.asarray, p), cfg, overwrite=True)")
  env = dict(os.environ, TINYCLIP_FAULT="kill_in_write:export", PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     timeout=300, cwd=tmp_path)
  assert r.returncode == -9, r.stderr[-2000:]
  assert storage.exists(f"{path}/params") and not storage.is_published(path)
  with pytest.raises(ValueError, match="incomplete"):
    model_io.load_model(path)
  assert os.listdir(tmp_path) == []  # nothing written to the local working folder


def test_metrics_segments_truncate_and_read(bucket):
  root = f"{bucket}/run_metrics"
  w = metrics.SegmentWriter(root)
  for s in (1, 2, 3):
    w.write_scalars(s, {"loss": float(s)})
  w.checkpoint(3)
  for s in (4, 5):
    w.write_scalars(s, {"loss": float(s)})
  w.close()
  assert storage.listdir(workdir.metrics_segments(root)) == ["00000003.jsonl", "00000005.jsonl"]
  rows = metrics.read_jsonl(f"{root}/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(s, float(s)) for s in range(1, 6)]
  metrics.truncate(root, 4)  # a checkpoint at 4 the segment of 5 went past
  assert [r["step"] for r in metrics.read_jsonl(root)] == [1, 2, 3, 4]
  events = sorted(n for n in storage.listdir(root) if "tfevents" in n)
  assert events == ["events.out.tfevents.0000000003.tinyclip",
                    "events.out.tfevents.0000000004.tinyclip"]
  # The events are real TensorBoard files: read back by tensorboard's own loader.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=import-outside-toplevel
  local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ev{os.getpid()}")
  with open(local, "wb") as f:
    f.write(storage.read_bytes(f"{root}/{events[1]}"))
  got = [(e.step, v.tag, v.simple_value) for e in event_file_loader.LegacyEventFileLoader(
      local).Load() for v in e.summary.value]
  os.remove(local)
  assert got == [(4, "loss", 4.0)]


def test_kill_inside_a_metrics_segment_write_then_resume(bucket, tmp_path):
  """SIGKILL between a segment's rows and its event file (the fault hook, in a child
  writing steps 1-3 then 4-6): the bucket holds every row up to the kill; the resume
  from a checkpoint at 3 truncates, logs 4-6 again, and each step is read once. The
  killed segment's TensorBoard copy is the one thing lost (metrics._write_segment)."""
  root = f"{bucket}/killed_metrics"
  script = ("from tinyclip_jax import metrics; w = metrics.SegmentWriter(%r)\n"
            "for s in range(1, 7):\n"
            "  w.write_scalars(s, {'loss': float(s)})\n"
            "  if s %% 3 == 0: w.checkpoint(s)\n" % root)
  env = dict(os.environ, TINYCLIP_FAULT="kill_in_write:metrics_segment", PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     timeout=120, cwd=tmp_path)
  assert r.returncode == -9, r.stderr[-2000:]
  # Killed inside the first segment's write: its rows are in, its events are not.
  assert [row["step"] for row in metrics.read_jsonl(root)] == [1, 2, 3]
  assert not [n for n in storage.listdir(root) if "tfevents" in n]
  metrics.truncate(root, 3)  # the resume, from the checkpoint of step 3
  w = metrics.SegmentWriter(root)
  for s in (4, 5, 6):
    w.write_scalars(s, {"loss": float(s)})
  w.close()
  assert [(row["step"], row["loss"]) for row in metrics.read_jsonl(root)] == [
      (s, float(s)) for s in range(1, 7)]
  assert sorted(n for n in storage.listdir(root) if "tfevents" in n) == [
      "events.out.tfevents.0000000006.tinyclip"]
  assert os.listdir(tmp_path) == []


def test_retries_on_503_and_429_then_403_is_one_sentence(bucket, gcs):
  proxy = FaultyProxy(gcs.url, latency=0.02)
  try:
    use_endpoint(proxy.url)
    for status in (503, 429):
      proxy.status, proxy.fail = status, 2
      t0 = time.time()
      storage.write_text(f"{bucket}/retry/{status}.txt", "ok")
      assert proxy.fail == 0 and storage.read_text(f"{bucket}/retry/{status}.txt") == "ok"
      assert time.time() - t0 > 1.0  # backed off (gcsfs: 1 s, then 2 s, ± jitter)
    proxy.forbidden.add(bucket[len("gs://"):])
    with pytest.raises(storage.StorageError) as e:
      storage.write_text(f"{bucket}/retry/x.txt", "no")
    msg = str(e.value)
    assert msg.startswith(f"permission denied on the bucket {bucket}") and "\n" not in msg
  finally:
    use_endpoint(gcs.url)
    proxy.close()


def test_local_copy_and_staged_output_for_local_only_tools(bucket, tmp_path):
  """convert's non-flax formats read and write local files: gs:// sources are fetched,
  gs:// outputs written locally then uploaded (folders published last)."""
  with storage.staged_output(f"{bucket}/hf", folder=True) as out:
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
      f.write("{}")
    assert not storage.exists(f"{bucket}/hf/config.json")  # nothing up before the end
  assert storage.is_published(f"{bucket}/hf")
  with storage.staged_output(f"{bucket}/oc/model.bin", folder=False) as out:
    with open(out, "wb") as f:
      f.write(b"w")
    with open(os.path.join(os.path.dirname(out), "open_clip_config.json"), "w") as f:
      f.write("{}")
  assert storage.listdir(f"{bucket}/oc") == ["model.bin", "open_clip_config.json"]
  with storage.local_copy(f"{bucket}/hf") as local:
    assert sorted(os.listdir(local)) == [storage.MARKER, "config.json"]
    kept = local
  assert not os.path.exists(kept)
  with storage.local_copy(f"{bucket}/oc/model.bin") as local:
    assert open(local, "rb").read() == b"w"


def test_folder_eval_task_reads_from_the_bucket(bucket, tmp_path):
  """eval's folder:PATH (images + labels.json) on gs:// loads what the local folder does."""
  from tinyclip_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.eval import zeroshot  # pylint: disable=import-outside-toplevel
  assert synthetic.main(["--split=eval", "--num=6", f"--out={tmp_path / 'd'}",
                         "--image_size=32"]) == 0
  storage.copy_local(str(tmp_path / "d"), f"{bucket}/folder_task")
  local = zeroshot.folder_task(str(tmp_path / "d"), 32)
  remote = zeroshot.folder_task(f"{bucket}/folder_task", 32)
  np.testing.assert_array_equal(local.images, remote.images)
  np.testing.assert_array_equal(local.labels, remote.labels)
  assert local.classes == remote.classes
  with pytest.raises(FileNotFoundError, match=f"{bucket}/nothing/labels.json does not exist"):
    zeroshot.folder_task(f"{bucket}/nothing", 32)


def test_an_unreachable_endpoint_is_one_sentence_in_seconds(tmp_path):
  """No network (here: an emulator address nothing listens on): the first gs:// access
  says so at once, exit 2, instead of gcsfs retrying every call for minutes."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:  # a loopback port that is free, then closed
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  env.pop("TENSORSTORE_GCS_HTTP_URL", None)
  t = time.time()
  r = subprocess.run([sys.executable, "-m", "tinyclip_jax.main",
                      f"--config={ROOT}/configs/smoke.py", "--workdir=gs://any-bucket/run"],
                     env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: cannot reach the GCS endpoint 127.0.0.1:{port} ([Errno 111] "
                    "Connection refused); check this machine's network (or "
                    "STORAGE_EMULATOR_HOST) before using gs:// paths."], r.stderr[-2000:]
  assert time.time() - t < 60  # JAX's import and the config included; no retries
  assert os.listdir(tmp_path) == []


def test_convert_refuses_an_existing_gcs_destination_before_reading(bucket):
  """convert's early destination check reads the bucket as it reads a local disk."""
  from tinyclip_jax.convert.__main__ import UsageError, check_destination  # pylint: disable=import-outside-toplevel
  storage.write_bytes(f"{bucket}/conv/model.safetensors", b"x")
  storage.write_text(f"{bucket}/conv/hf/config.json", "{}")
  for kind, path, match in [
      ("open_clip", f"{bucket}/conv/model.safetensors", "already exists; pass --overwrite"),
      ("open_clip", f"{bucket}/conv/hf.safetensors", None),
      ("tinyclip", f"{bucket}/conv", "must end in"),
      ("hf", f"{bucket}/conv/hf", "already exists and is not empty; pass --overwrite"),
      ("hf", f"{bucket}/conv/model.safetensors", "is a file; give a folder path"),
      ("flax", f"{bucket}/conv/new", None)]:
    if match is None:
      check_destination(kind, path, overwrite=False)
    else:
      with pytest.raises(UsageError, match=match):
        check_destination(kind, path, overwrite=False)
  check_destination("hf", f"{bucket}/conv/hf", overwrite=True)
