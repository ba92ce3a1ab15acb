"""Training input: per-host batches with a saved position, prefetched on a thread.

`make_train_input` picks the source: the embedded generated pairs (SyntheticPairs,
position = global index of the next example) or sharded image–text data
(data/sharded.py: webdataset, TFRecord or TFDS files; position = epoch, window,
offset and skipped counts). The position is part of every checkpoint (one per
process, gathered by `gather_state`), so a resumed run neither repeats nor skips
examples, also on another number of processes (data/redeal.py). Each process makes
only its own rows of the global batch; the loop assembles global arrays from them on
the prefetch thread.
"""
from __future__ import annotations

import json
import queue
import threading
import jax
import ml_collections
import numpy as np
from absl import logging

from tinyclip_jax import preprocess, tokenizer
from tinyclip_jax.data import synthetic


class SyntheticPairs:
  """Image–caption pairs of the embedded generated dataset, batch by batch.

  Global batch b holds examples [b·B, (b+1)·B); process p makes its contiguous
  slice of rows, so the union over processes is the same for any host count.
  """

  def __init__(self,
               cfg: ml_collections.ConfigDict,
               image_size: int,
               context_length: int,
               global_batch: int,
               process_index: int = 0,
               process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} "
                       "processes; make it a multiple of the process count.")
    self.spec = synthetic.from_data_config(cfg, image_size)
    self.context_length = context_length
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.position = 0

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    raw = synthetic.make_batch(self.spec, "train", self.position + self.offset, self.local_batch)
    self.position += self.global_batch
    return {
        "images": preprocess.normalize(raw["images"]),
        "tokens": tokenizer.tokenize(raw["captions"], self.context_length)
    }


KINDS = ("synthetic", "webdataset", "tfrecord", "tfds")


def make_train_input(cfg: ml_collections.ConfigDict, image_size: int, context_length: int,
                     global_batch: int, cache: tuple[str, dict] | None = None):
  """The source named by cfg.kind; a missing shard or dataset raises a DataError
  naming it, before anything compiles. `cache`: (path, manifest) of a per-sample
  teacher cache (data/sample_cache.py), whose embeddings then come with each batch."""
  if cfg.kind not in KINDS:
    raise ValueError(f"data.kind {cfg.kind!r} is unknown; use one of {KINDS}.")
  if cfg.kind == "synthetic":
    return SyntheticPairs(cfg, image_size, context_length, global_batch, jax.process_index(),
                          jax.process_count())
  from tinyclip_jax.data import sharded, tfds_input  # pylint: disable=import-outside-toplevel
  units = reader = None
  if cfg.kind == "tfds":
    b = tfds_input.builder(cfg.tfds_name, cfg.data_dir)
    units = tfds_input.split_files(b, cfg.tfds_split)
    reader = tfds_input.record_reader(b, cfg.image_key, cfg.text_key)
  return sharded.ShardedPairs(
      cfg,
      image_size,
      context_length,
      global_batch,
      jax.process_index(),
      jax.process_count(),
      units=units,
      reader=reader,
      cache=cache)


def _check_generator(cfg: ml_collections.ConfigDict) -> None:
  """The generator's fields (data.captions, max_objects, object_scale, backgrounds), before
  anything trains: the synthetic eval task draws with them whatever data.kind is."""
  try:  # any valid image size: the model's is checked at setup
    synthetic.from_data_config(cfg, 64)
  except ValueError as e:
    raise ValueError(f"data.{e}; fix it in the config.") from e


def check(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming a bad data field, a missing shard or an unprepared
  TFDS dataset; lists files, reads none."""
  if cfg.kind not in KINDS:
    raise ValueError(f"data.kind {cfg.kind!r} is unknown; use one of {KINDS}.")
  _check_generator(cfg)
  k = cfg.get("augmentations", 0)
  if not isinstance(k, int) or k < 0:
    raise ValueError(f"data.augmentations must be a whole number >= 0, got {k!r}.")
  if k and cfg.kind not in ("webdataset", "tfrecord"):
    raise ValueError(f"data.augmentations={k} draws crops from each sample's key, which "
                     f"webdataset and tfrecord shards give, not data.kind={cfg.kind!r}; set "
                     "data.augmentations=0.")
  if cfg.kind == "synthetic":
    return
  for f in ("shuffle_buffer", "shards_per_window", "min_image_size", "max_image_pixels"):
    if int(cfg[f]) <= 0:
      raise ValueError(f"data.{f} must be positive, got {cfg[f]}.")
  if not 0 < cfg.crop_scale_min <= cfg.crop_scale_max <= 1:
    raise ValueError(f"data.crop_scale_min/max ({cfg.crop_scale_min}, {cfg.crop_scale_max}) "
                     "must satisfy 0 < min <= max <= 1.")
  if not 0 < cfg.crop_ratio_min <= cfg.crop_ratio_max:
    raise ValueError(f"data.crop_ratio_min/max ({cfg.crop_ratio_min}, {cfg.crop_ratio_max}) "
                     "must satisfy 0 < min <= max.")
  from tinyclip_jax.data import decode, shards, tfds_input  # pylint: disable=import-outside-toplevel
  decode.check_jpeg_scale(cfg.get("jpeg_scale", 1))
  if cfg.kind == "tfds":
    tfds_input.split_files(tfds_input.builder(cfg.tfds_name, cfg.data_dir), cfg.tfds_split)
  else:
    shards.resolve(cfg.train)


def gather_state(state: dict) -> dict:
  """Every process's input state, for the checkpoint: {"hosts": [state of process 0,
  ...]}. A collective: all processes call it at the same step, on the main thread."""
  if jax.process_count() == 1:
    return {"hosts": [state]}
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = json.dumps(state).encode()
  size = int(np.max(multihost_utils.process_allgather(np.int32(len(raw)))))
  buf = np.zeros(size, np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  rows = multihost_utils.process_allgather(buf[None], tiled=True)
  return {"hosts": [json.loads(bytes(r).rstrip(b"\0")) for r in rows]}


def host_state(saved: dict, process_index: int | None = None,
               process_count: int | None = None) -> dict:
  """This process's state from a checkpoint's input state (defaults: jax's process
  index and count). Shard positions saved by as many processes: this process's own.
  Shard positions saved by another number: the gathered {"hosts": [...]} itself, which
  ShardedPairs.set_state re-deals (redeal.py: the unread rest of the interrupted
  epochs goes to the new processes; nothing repeated or left out). One state shared
  by all processes (the synthetic source's global position, or an older checkpoint):
  that state, on any number of processes."""
  if "hosts" not in saved:
    return saved
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  hosts = saved["hosts"]
  if all(isinstance(h, dict) and "epoch" in h for h in hosts):  # shard positions
    return hosts[index] if len(hosts) == count else saved
  if all(h == hosts[0] for h in hosts):
    return hosts[0]
  if len(hosts) != count:
    raise ValueError(f"the checkpoint's input position holds {len(hosts)} different states "
                     f"of an unknown kind and this run has {count} processes; resume with "
                     "the code and data config that saved it, or start a new workdir.")
  return hosts[index]


class InputStalled(ValueError):
  """The input gave no usable sample for data.stall_records records on some process."""


class InputMonitor:
  """Checks the gathered input state at points every process reaches together (before
  the first step, and at every step that logs, evaluates or checkpoints), so that all
  processes stop at the same step when one of them has no usable input: a process
  that stopped alone would leave the others waiting in the next collective."""

  MIN_RECORDS_FOR_WARNING = 1000  # a smaller sample says little about the fraction

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg, self.warned = cfg, False

  def check(self, gathered: dict) -> None:
    hosts = gathered["hosts"]
    skipped = skipped_metrics(gathered)
    dropped = {k.split("/", 1)[1]: v for k, v in skipped.items() if v and k != "skipped/bad_utf8"}
    counts = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
    stalled = [i for i, h in enumerate(hosts) if h.get("stalled")]
    if stalled:
      raise InputStalled(
          f"the training input gave no usable sample in {int(self.cfg.stall_records)} records "
          f"in a row on process(es) {stalled} of {len(hosts)}; skipped so far: {counts}; "
          "check data.train and its samples (captions are KEY.txt, or KEY.json's field "
          f"data.caption_key={self.cfg.caption_key!r}).")
    used = sum(int(h.get("used", 0)) for h in hosts)
    records = used + sum(dropped.values())
    if (not self.warned and records >= self.MIN_RECORDS_FOR_WARNING and
        used < float(self.cfg.min_usable_fraction) * records):
      self.warned = True
      logging.warning("only %d of %d training records (%.1f%%) were usable, below "
                      "data.min_usable_fraction=%s; skipped: %s", used, records,
                      100 * used / records, self.cfg.min_usable_fraction, counts)


def skipped_metrics(gathered: dict) -> dict[str, int]:
  """{"skipped/<reason>": count summed over processes} of a gathered state."""
  out: dict[str, int] = {}
  for s in gathered["hosts"]:
    for reason, n in s.get("skipped", {}).items():
      out[f"skipped/{reason}"] = out.get(f"skipped/{reason}", 0) + int(n)
  return out


class Prefetcher:
  """Iterates (batch, source state after that batch), made `size` batches ahead on a
  thread; the state travels with its batch so a checkpoint saves the right position.
  `transform` (e.g. host → device arrays) runs on that thread too, so the transfer of
  the next batches overlaps the current step.

  `close()` stops and joins the thread and then closes the source. It must run before
  the interpreter shuts down: a daemon thread left inside XLA's host-to-device copy,
  or a tf.data iterator left to the garbage collector at exit, aborts or hangs the
  process after all work is done (see ShardedPairs.close). Use it as a context
  manager, or call close() in a `finally`.
  """

  JOIN_TIMEOUT_S = 120.0

  def __init__(self, source, size: int, transform=None):
    self.source, self.size = source, int(size)
    self.transform = transform or (lambda b: b)
    self._peeked = None
    self._queue: queue.Queue = queue.Queue(maxsize=max(self.size, 1))
    self._stop = threading.Event()
    self._thread = None
    if self.size > 0:
      self._thread = threading.Thread(target=self._work, name="prefetch", daemon=True)
      self._thread.start()

  def _make(self):
    batch = next(self.source)
    return self.transform(batch), self.source.get_state()

  def _work(self):
    try:
      while not self._stop.is_set() and self._put(self._make()):
        pass
    except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
      self._put(e)

  def _put(self, item) -> bool:
    """Queues `item` unless close() is called while waiting for room."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def peek(self) -> tuple[dict, dict]:
    """The next item without consuming it."""
    if self._peeked is None:
      self._peeked = next(self)
    return self._peeked

  def __next__(self) -> tuple[dict, dict]:
    if self._peeked is not None:
      item, self._peeked = self._peeked, None
      return item
    if self._thread is None:
      return self._make()
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    """Stops and joins the thread, then closes the source. Idempotent."""
    self._stop.set()
    if self._thread is not None:
      while True:  # unblock a producer waiting on a full queue
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(self.JOIN_TIMEOUT_S)
      if self._thread.is_alive():
        logging.warning("the input thread did not stop within %.0f s", self.JOIN_TIMEOUT_S)
      self._thread = None
    self._peeked = None
    close_source(self.source)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def close_source(source) -> None:
  """Ends a batch source's readers (a tf.data iterator, files) if it has any."""
  close = getattr(source, "close", None)
  if close is not None:
    close()


def prefetch(source, size: int, transform=None) -> Prefetcher:
  """See Prefetcher."""
  return Prefetcher(source, size, transform)
