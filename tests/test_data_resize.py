"""Sharded input saved by 2 processes resumes on 1 and on 3 (and again on 2 from a
resized run): every sample of the interrupted epochs is read exactly once over the
old and the new processes, with the crops the old process would have made; then each
new process reads exactly the normal stream of the new count from the first epoch no
old process had started; skipped counts add up; the same checkpoint resumed twice
gives the same stream. The references are the unresized streams (the old processes
continuing, fresh processes of the new count started at that epoch) and the sample
keys of the shard set, not the re-deal's own bookkeeping."""
import collections
import json

import numpy as np
import pytest

from tinyclip_jax.data import make_shards, pipeline, sharded, shards, teacher_cache
from tinyclip_jax.train import defaults

SHARDS, PER_SHARD, SIZE, CTX, LOCAL = 5, 8, 32, 16, 4
BAD = {3: "corrupt_image", 12: "empty_caption", 20: "missing_caption", 30: "bad_utf8",
       36: "tiny_image"}
KEPT = {"bad_utf8"}  # counted, and the sample is used


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("wds"))
  make_shards.write_shards(d, SHARDS, PER_SHARD, SIZE, bad=BAD)
  c = defaults.base_config().data
  c.kind, c.train, c.shards_per_window, c.shuffle_buffer = "webdataset", f"{d}/*.tar", 2, 8
  return c


def good_keys():
  return [f"{i:09d}" for i in range(SHARDS * PER_SHARD) if BAD.get(i, "ok") in ("ok", *KEPT)]


def source(cfg, index, count, local=LOCAL, state=None):
  src = sharded.ShardedPairs(cfg, SIZE, CTX, local * count, process_index=index,
                             process_count=count)
  if state is not None:
    src.set_state(state)
  return src


def read(src, batches):
  """(keys, images, state after every batch) of `batches` batches; closes the source."""
  keys, images, states = [], [], []
  try:
    for _ in range(batches):
      b = src.next_batch()
      keys += b["keys"]
      images += list(b["images"])
      states.append(src.get_state())
  finally:
    src.close()
  return keys, images, states


def as_saved(states):
  return json.loads(json.dumps({"hosts": states}))  # as the checkpoint stores it


def skipped_sum(states):
  return sum((collections.Counter(s["skipped"]) for s in states), collections.Counter())


SAVED_AT = 5  # batches


@pytest.fixture(scope="module")
def old_run(cfg):
  """2 processes, saved after 5 batches each: process 1 (2 shards) is already in epoch
  1, process 0 (3 shards) still in epoch 0. What they read after it: the crops of the
  unresized run."""
  runs = [read(source(cfg, p, 2), SAVED_AT + 12) for p in range(2)]
  saved = as_saved([states[SAVED_AT - 1] for *_, states in runs])
  assert [h["epoch"] for h in saved["hosts"]] == [0, 1]
  crops = collections.defaultdict(list)
  for keys, images, _ in runs:
    for k, x in zip(keys[SAVED_AT * LOCAL:], images[SAVED_AT * LOCAL:]):
      crops[k].append(x)
  return [k for keys, *_ in runs for k in keys[:SAVED_AT * LOCAL]], saved, crops


@pytest.fixture(scope="module")
def on_three(cfg, old_run):
  return resume(cfg, old_run[1], 3, 9)


def resume(cfg, saved, count, batches):
  """The new processes' (keys, images, states) after resuming `saved` on `count`."""
  return [read(source(cfg, j, count, state=pipeline.host_state(saved, j, count)), batches)
          for j in range(count)]


def split_tail(cfg, new, count, epoch):
  """Each new process's stream as tail + the normal stream of process j of `count` from
  (epoch, 0, 0) (read one sample per batch). Returns [(tail keys, tail images, samples
  of the normal stream read, skipped counts of the normal stream after them)]."""
  out = []
  for j, (keys, images, _) in enumerate(new):
    ref_keys, ref_images, ref_states = read(
        source(cfg, j, count, local=1, state={"epoch": epoch, "window": 0, "offset": 0}),
        len(keys))
    t = next(t for t in range(len(keys) + 1) if keys[t:] == ref_keys[:len(keys) - t])
    m = len(keys) - t
    assert m >= LOCAL, "read on: too little of the normal stream to align"
    np.testing.assert_array_equal(np.array(images[t:]), np.array(ref_images[:m]))
    out.append((keys[:t], images[:t], m, ref_states[m - 1]["skipped"]))
  return out


def end_epoch(states):
  """The first epoch no process has started, by hand: window 0 and offset 0 mean
  nothing of the epoch was read."""
  return max(s["epoch"] + (s["window"] > 0 or s["offset"] > 0) for s in states)


@pytest.mark.parametrize("count", [1, 3])
def test_resize_reads_the_rest_of_the_epochs_once_then_the_new_deal(cfg, old_run, on_three,
                                                                     count):
  before, saved, crops = old_run
  epoch = end_epoch(saved["hosts"])
  assert epoch == 2
  new = on_three if count == 3 else resume(cfg, saved, 1, 21)
  parts = split_tail(cfg, new, count, epoch)
  # the interrupted epochs: each good sample exactly `epoch` times, over old and new
  tails = collections.Counter(before) + sum(
      (collections.Counter(k) for k, *_ in parts), collections.Counter())
  assert tails == collections.Counter(good_keys() * epoch)
  for keys, images, *_ in parts:  # the crops of the unresized run
    for k, x in zip(keys, images):
      assert any(np.array_equal(x, c) for c in crops[k]), k
  # skipped: every bad sample of the interrupted epochs once, plus the normal streams'
  finals = [s[-1] for *_, s in new]
  want = collections.Counter(list(BAD.values()) * epoch)
  for *_, normal_skipped in parts:
    want += collections.Counter(normal_skipped)
  assert +skipped_sum(finals) == +want
  assert sum(s["used"] for s in finals) == len(before) + sum(len(k) for k, *_ in new)
  assert all("tail" not in s and s["epoch"] >= epoch for s in finals)
  # its batches are not those of an unresized run, which a teacher cache replays
  assert all(s["resized"] for s in finals)
  with pytest.raises(teacher_cache.CacheError, match="input was resumed on another number"):
    teacher_cache.check_input(finals[0], "/c")


def test_resumes_are_deterministic_and_a_same_count_resume_is_exact(cfg, old_run, on_three):
  _, saved, _ = old_run
  for j in (0, 2):  # processes 0 and 2 of 3 again: the same samples, crops and states
    k1, x1, s1 = on_three[j]
    k2, x2, s2 = read(source(cfg, j, 3, state=pipeline.host_state(saved, j, 3)), 3)
    assert k1[:3 * LOCAL] == k2 and s1[:3] == s2
    np.testing.assert_array_equal(np.array(x1[:3 * LOCAL]), np.array(x2))
  # a same-count resume inside the tail continues bit-exactly, as without a resize
  j = next(j for j, (*_, states) in enumerate(on_three) if "tail" in states[1])
  keys, images, states = on_three[j]
  k2, x2, s2 = read(source(cfg, j, 3, state=pipeline.host_state(
      as_saved([s[1] for *_, s in on_three]), j, 3)), 3)
  assert keys[2 * LOCAL:5 * LOCAL] == k2 and states[2:5] == s2
  np.testing.assert_array_equal(np.array(images[2 * LOCAL:5 * LOCAL]), np.array(x2))
  # the merged counts start on process 0: the totals stay those of the saved run
  starts = [pipeline.host_state(saved, j, 3) for j in range(3)]
  got = [source(cfg, j, 3, state=s).get_state() for j, s in enumerate(starts)]
  assert +skipped_sum(got) == +skipped_sum(saved["hosts"])
  assert [s["used"] for s in got] == [sum(h["used"] for h in saved["hosts"]), 0, 0]


def test_a_resized_run_resized_again(cfg, old_run, on_three):
  """2 → 3 processes saved after 2 batches each (some still in their tail), → 2."""
  before = old_run[0]
  saved = as_saved([states[1] for *_, states in on_three])
  assert any("tail" in h for h in saved["hosts"])
  epoch = end_epoch(saved["hosts"])
  new = resume(cfg, saved, 2, 12)
  parts = split_tail(cfg, new, 2, epoch)
  read_keys = before + [key for keys, *_ in on_three for key in keys[:2 * LOCAL]] + \
      [key for tail, *_ in parts for key in tail]
  assert collections.Counter(read_keys) == collections.Counter(good_keys() * epoch)


def test_fresh_positions_resize_to_a_fresh_start_and_bad_positions_are_refused(cfg):
  fresh = as_saved([source(cfg, p, 2).get_state() for p in range(2)])
  for j in range(3):  # nothing read: the new count's own start, nothing to re-deal
    state = source(cfg, j, 3, state=pipeline.host_state(fresh, j, 3)).get_state()
    assert state == source(cfg, j, 3).get_state()
    teacher_cache.check_input(state, "/c")
  with pytest.raises(shards.DataError, match="is not one of sharded input"):
    source(cfg, 0, 3, state=pipeline.host_state({"hosts": [{"position": 64}] * 2}, 0, 3))
  # data.train now has fewer shards than the saved deal: process 1 of 2 had 1 window
  bad = as_saved([dict(h, window=1, offset=3) for h in fresh["hosts"]])
  with pytest.raises(shards.DataError, match=r"names window 1 of epoch 0 of process 1 of 2, "
                     r"which data.train's 5 shard\(s\) in windows of "
                     r"data.shards_per_window=2 do not have"):
    source(cfg, 0, 3, state=pipeline.host_state(bad, 0, 3))
