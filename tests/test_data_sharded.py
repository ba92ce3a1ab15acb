"""Sharded training input: patterns, determinism, exact resume (sample keys counted
across a restart), per-host sharding, and bad samples counted by reason."""
import json
import os

import numpy as np
import pytest

from tinyclip_jax.data import make_shards, pipeline, sharded, shards
from tinyclip_jax.train import defaults

SHARDS, PER_SHARD, SIZE, CTX = 4, 16, 32, 16
BAD = {
    3: "corrupt_image",
    10: "empty_caption",
    17: "missing_caption",
    25: "bad_utf8",
    31: "tiny_image",
    40: "huge_image",
    50: "corrupt_image",
    55: "missing_caption",
    60: "empty_caption"
}  # 56 good samples: 7 batches of 8
REPAIRED = {"bad_utf8"}  # counted, but the sample is kept with U+FFFD


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("wds"))
  keys = make_shards.write_shards(d, SHARDS, PER_SHARD, SIZE, bad=BAD)
  return d, keys


def data_cfg(pattern, **kw):
  c = defaults.base_config().data
  c.kind, c.train, c.shards_per_window, c.shuffle_buffer = "webdataset", pattern, 2, 8
  c.update(kw)
  return c


def good_keys():
  n = SHARDS * PER_SHARD
  return {f"{i:09d}" for i in range(n) if BAD.get(i, "ok") in ("ok", *REPAIRED)}


def take(src, n):
  keys, images = [], []
  for _ in range(n):
    b = src.next_batch()
    keys += b["keys"]
    images.append(b["images"])
  return keys, np.concatenate(images)


def test_resolve_patterns(shard_set, tmp_path):
  d, keys = shard_set
  assert shards.resolve(f"{d}/{{00000..00003}}.tar") == sorted(keys)
  assert shards.resolve(f"{d}/*.tar") == sorted(keys)
  assert shards.resolve(f"{d}/0000{{0,2}}.tar::{d}/00003.tar") == \
      [f"{d}/00000.tar", f"{d}/00002.tar", f"{d}/00003.tar"]
  with pytest.raises(shards.DataError, match="00004.tar does not exist"):
    shards.resolve(f"{d}/{{00000..00004}}.tar")
  with pytest.raises(shards.DataError, match="matches no file"):
    shards.resolve(f"{tmp_path}/*.tar")
  with pytest.raises(shards.DataError, match="data.train is empty"):
    shards.resolve("")


def test_one_epoch_is_every_good_sample_once_and_counts_every_bad_one(shard_set):
  d, _ = shard_set
  src = sharded.ShardedPairs(data_cfg(f"{d}/*.tar"), SIZE, CTX, 8)
  n_good = len(good_keys())
  keys, images = take(src, n_good // 8)  # the whole first epoch: 56 good samples
  assert sorted(keys) == sorted(good_keys())
  assert images.shape == (n_good, SIZE, SIZE, 3) and images.dtype == np.float32
  assert np.isfinite(images).all()
  expected = {r: 0 for r in shards.REASONS}
  for kind in BAD.values():
    expected[kind] += 1
  assert src.get_state()["skipped"] == expected
  assert src.get_state()["epoch"] == 0
  keys2, _ = take(src, n_good // 8)  # epoch 1: the same samples, another order
  assert sorted(keys2) == sorted(good_keys()) and keys2 != keys
  assert src.get_state()["skipped"] == {r: 2 * n for r, n in expected.items()}


def test_same_seed_same_batches_other_seed_other_order(shard_set):
  d, _ = shard_set
  k1, x1 = take(sharded.ShardedPairs(data_cfg(f"{d}/*.tar"), SIZE, CTX, 8), 3)
  k2, x2 = take(sharded.ShardedPairs(data_cfg(f"{d}/*.tar"), SIZE, CTX, 8), 3)
  assert k1 == k2
  np.testing.assert_array_equal(x1, x2)
  k3, _ = take(sharded.ShardedPairs(data_cfg(f"{d}/*.tar", seed=1), SIZE, CTX, 8), 3)
  assert k3 != k1


@pytest.mark.parametrize("stop", [3, 7, 9])  # mid-window, at the epoch's end, in epoch 1
def test_resume_neither_repeats_nor_skips(shard_set, stop):
  d, _ = shard_set
  cfg = data_cfg(f"{d}/*.tar")
  total = 12
  ref_keys, ref_images = take(sharded.ShardedPairs(cfg, SIZE, CTX, 8), total)
  first = sharded.ShardedPairs(cfg, SIZE, CTX, 8)
  k1, x1 = take(first, stop)
  saved = json.loads(json.dumps(pipeline.gather_state(first.get_state())))  # as orbax stores it
  second = sharded.ShardedPairs(cfg, SIZE, CTX, 8)  # a fresh process after the kill
  second.set_state(pipeline.host_state(saved))
  k2, x2 = take(second, total - stop)
  assert k1 + k2 == ref_keys
  np.testing.assert_array_equal(np.concatenate([x1, x2]), ref_images)  # same crops too
  ref = sharded.ShardedPairs(cfg, SIZE, CTX, 8)
  take(ref, total)
  assert second.get_state() == ref.get_state()  # skipped counts carried over exactly


def test_hosts_read_disjoint_shards(shard_set):
  d, _ = shard_set
  cfg = data_cfg(f"{d}/*.tar", shards_per_window=1)
  per_host = [
      take(sharded.ShardedPairs(cfg, SIZE, CTX, 8, process_index=p, process_count=2), 5)[0]
      for p in range(2)
  ]
  assert all(len(k) == 20 for k in per_host)
  assert not set(per_host[0]) & set(per_host[1])
  # each host reads whole shards of its own: keys i // PER_SHARD name the shard
  shards_of = [{int(k) // PER_SHARD for k in keys} for keys in per_host]
  assert not shards_of[0] & shards_of[1] and len(shards_of[0] | shards_of[1]) == SHARDS
  with pytest.raises(shards.DataError, match="not divisible"):
    sharded.ShardedPairs(cfg, SIZE, CTX, 9, process_index=0, process_count=2)
  with pytest.raises(shards.DataError, match="every process needs at least one shard"):
    sharded.ShardedPairs(data_cfg(f"{d}/00000.tar"), SIZE, CTX, 8, process_count=2)


def test_truncated_tar_and_tfrecords(tmp_path):
  d = str(tmp_path)
  paths = make_shards.write_shards(d + "/t", 2, 8, SIZE, fmt="tar")
  first = sorted(paths)[0]
  with open(first, "rb") as f:
    data = f.read()
  with open(first, "wb") as f:  # cut inside the 5th sample's image
    f.write(data[:data.index(b"000000004.jpg") + 900])
  src = sharded.ShardedPairs(data_cfg(f"{d}/t/*.tar", shards_per_window=2), SIZE, CTX, 4)
  keys, _ = take(src, 3)
  assert sorted(keys) == [f"{i:09d}" for i in list(range(4)) + list(range(8, 16))]
  assert src.get_state()["skipped"]["truncated_tar"] == 1

  recs = make_shards.write_shards(
      d + "/r", 2, 8, SIZE, fmt="tfrecord", bad={
          2: "empty_caption",
          9: "tiny_image"
      })
  last = sorted(recs)[-1]
  with open(last, "rb") as f:
    data = f.read()
  with open(last, "wb") as f:
    f.write(data[:-100])  # the last record is cut
  # No shuffling: the order is the two shards record by record, and the cut record
  # (the last of shard 1) comes after the epoch's last good sample.
  src = sharded.ShardedPairs(
      data_cfg(f"{d}/r/*.tfrecord", kind="tfrecord", shuffle_buffer=1), SIZE, CTX, 13)
  good = [f"{i:09d}" for i in range(15) if i not in (2, 9)]
  keys, _ = take(src, 1)
  assert sorted(keys) == good
  s = src.get_state()["skipped"]
  assert (s["empty_caption"], s["tiny_image"], s["truncated_tfrecord"]) == (1, 1, 0)
  keys, _ = take(src, 1)
  assert sorted(keys) == good
  s = src.get_state()["skipped"]
  assert (s["empty_caption"], s["tiny_image"], s["truncated_tfrecord"]) == (2, 2, 1)


def test_bad_utf8_is_repaired_not_dropped(shard_set):
  d, _ = shard_set
  src = sharded.ShardedPairs(data_cfg(f"{d}/00001.tar", shards_per_window=1), SIZE, CTX, 4)
  captions = {}
  for _ in range(3):
    b = src.next_batch()
    captions.update(zip(b["keys"], b["captions"]))
  assert captions["000000025"].endswith(" \ufffd\ufffd")
  assert src.get_state()["skipped"]["bad_utf8"] == 1


def test_config_errors_name_the_problem(shard_set, tmp_path):
  d, _ = shard_set
  with pytest.raises(ValueError, match=r"00004.tar does not exist \(and 5 more of 10\)"):
    pipeline.check(data_cfg(f"{d}/{{00000..00009}}.tar"))
  with pytest.raises(ValueError, match="data.kind 'laion' is unknown"):
    pipeline.check(data_cfg(d, kind="laion"))
  with pytest.raises(ValueError, match="crop_scale"):
    pipeline.check(data_cfg(f"{d}/*.tar", crop_scale_min=0.0))
  pipeline.check(data_cfg(f"{d}/*.tar"))
  assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  import tfds_fixtures  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds_fixtures.build_coco_captions(d, n=20, shards=4)
  return d, tfds_fixtures.caption_sets(20)


def test_tfds_training_input(coco_dir):
  d, caption_sets = coco_dir
  cfg = data_cfg("", kind="tfds", tfds_name="coco_captions", data_dir=d, tfds_split="train")
  pipeline.check(cfg)
  src = pipeline.make_train_input(cfg, SIZE, CTX, 4)
  chosen = {}
  for epoch in range(3):
    keys = []
    for _ in range(5):  # 20 images: one epoch
      b = src.next_batch()
      keys += b["keys"]
      for k, c in zip(b["keys"], b["captions"]):
        chosen.setdefault(k, set()).add(c)
    assert len(set(keys)) == 20 and src.get_state()["epoch"] == epoch
  # one image's captions are all from its own set; some image got two different ones
  assert all(any(c <= set(s) for s in caption_sets) for c in chosen.values())
  assert any(len(c) > 1 for c in chosen.values())

  ref = pipeline.make_train_input(cfg, SIZE, CTX, 4)
  ref_keys = take(ref, 6)[0]
  first = pipeline.make_train_input(cfg, SIZE, CTX, 4)
  k1 = take(first, 4)[0]
  second = pipeline.make_train_input(cfg, SIZE, CTX, 4)
  second.set_state(json.loads(json.dumps(first.get_state())))
  assert k1 + take(second, 2)[0] == ref_keys


def test_tfds_errors_name_dataset_and_place(coco_dir, tmp_path):
  d, _ = coco_dir
  cfg = data_cfg("", kind="tfds", tfds_name="coco_captionz", data_dir=d)
  with pytest.raises(ValueError, match="'coco_captionz' is not a TFDS dataset name"):
    pipeline.check(cfg)
  cfg.tfds_name, cfg.data_dir = "coco_captions", str(tmp_path)
  with pytest.raises(ValueError, match=f"not prepared in {tmp_path} .looked in {tmp_path}/coco"):
    pipeline.check(cfg)
  cfg.data_dir, cfg.tfds_split = d, "validation"
  with pytest.raises(ValueError, match="has no split 'validation'"):
    pipeline.check(cfg)


GATHER = r'''
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid = int(sys.argv[1])
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=pid)
from tinyclip_jax.data import pipeline
state = {"epoch": pid, "window": 3, "offset": 10 + 1000 * pid,
         "skipped": {"corrupt_image": pid + 1, "bad_utf8": 2}, "pad": "x" * (5 + 40 * pid)}
g = pipeline.gather_state(state)
print(json.dumps({"gathered": g, "mine": pipeline.host_state(json.loads(json.dumps(g))),
                  "skipped": pipeline.skipped_metrics(g)}))
'''


def test_gather_state_across_two_processes(tmp_path):
  """Two processes on loopback (CPU collectives over gloo) gather their states."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
      PYTHONPATH=root,
      XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", GATHER, str(i), str(port)],
          env=env,
          cwd=root,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True) for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  hosts = results[0]["gathered"]["hosts"]
  assert results[1]["gathered"]["hosts"] == hosts and [h["offset"] for h in hosts] == [10, 1010]
  assert [r["mine"]["epoch"] for r in results] == [0, 1]
  assert results[0]["skipped"] == {"skipped/corrupt_image": 3, "skipped/bad_utf8": 4}
  # one process resuming two processes' shard positions gets them all, to re-deal
  # (test_data_resize.py); process 1 of 2 its own; a shared state: that state
  assert pipeline.host_state({"hosts": hosts}) == {"hosts": hosts}
  assert pipeline.host_state({"hosts": hosts}, 1, 2) == hosts[1]
  assert pipeline.host_state({"hosts": [{"position": 64}] * 2}) == {"position": 64}
