"""Sharded image–text training input on tf.data: webdataset tars, img2dataset
TFRecords or a TFDS dataset's files, read per host, shuffled, decoded, augmented,
tokenized, batched.

Determinism and resume. Each epoch deals the shards (units) to the hosts in an order
drawn from (seed, epoch); a host reads its shards in *windows* of
`shards_per_window`, interleaved record by record and shuffled by a buffer that is
seeded from (seed, epoch, window) and drained at the end of the window. So the
stream of records is a pure function of (seed, epoch, window, index in window), and
the input position is three integers: after a batch, the state is the window of its
last sample and the index after it. A restart rebuilds that window and skips the
records before the position, before decoding (reading, not decoding, at most one
window of records), and continues bit-exactly: no sample repeated or skipped. We
chose this over tf.data's iterator checkpoints because those hold the shuffle buffer
(gigabytes of image bytes per host), are not JSON, and cannot be taken for the batch
the trainer is at while the prefetcher runs ahead.

Resuming on another number of processes (a preempted slice replaced by a smaller or
larger one) re-deals the unread rest of the interrupted epochs, window by window, to
the new processes — each piece read exactly as its old process would have read it —
and deals the epochs after them among the new processes (redeal.py has the rule). No
sample is repeated or left out; the cost is reading, not decoding, the records of the
partly read windows up to their offsets again. The order of samples is not that of
an unresized run, but it is a pure function of the checkpoint and the new count.

Bad samples are markers in the stream (see shards.py) or fail to decode; cumulative
counts by reason are carried by `scan` in stream order, so the counts after a batch
are exact and part of the state.
"""
from __future__ import annotations

import gc

import numpy as np
import tensorflow as tf
from absl import logging

from tinyclip_jax import storage, tokenizer
from tinyclip_jax.data import augment, decode, redeal, sample_cache, shards

# TensorFlow stays off the accelerators: JAX owns them.
tf.config.set_visible_devices([], "GPU")
try:
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # no TPU devices known to TF, or already initialized
  pass

AUTOTUNE = tf.data.AUTOTUNE
_N = len(shards.REASONS) + 1
_BEAT = _N  # reason code of a heartbeat record (not a reason: outside the counts)


_fingerprint = augment.fingerprint


class ShardedPairs:
  """Per-host batches {"images", "tokens"} of a sharded image–text dataset with a
  JSON state {epoch, window, offset, used, skipped{reason: n}}, plus `tail` (pieces
  to read first) after a resume on another number of processes (redeal.py)."""

  def __init__(self,
               cfg,
               image_size: int,
               context_length: int,
               global_batch: int,
               process_index: int = 0,
               process_count: int = 1,
               units: list | None = None,
               reader=None,
               cache: tuple[str, dict] | None = None):
    if global_batch % process_count:
      raise shards.DataError(f"batch_size {global_batch} is not divisible by the "
                             f"{process_count} processes; use a multiple of the process count.")
    self.cfg = cfg
    self.kind = cfg.kind
    self.units = units if units is not None else shards.resolve(cfg.train)
    if len(self.units) < process_count:
      raise shards.DataError(f"data.train has {len(self.units)} shard(s) for {process_count} "
                             "processes; every process needs at least one shard.")
    self.reader = reader  # (path tensor) → dataset of raw records; None = shards.READERS
    self.image_size, self.context_length = image_size, context_length
    self.jpeg_scale = decode.check_jpeg_scale(cfg.get("jpeg_scale", 1))
    self.local_batch = global_batch // process_count
    # data.augmentations > 0: crops drawn from each sample's key (sample_cache.py); with
    # a per-sample teacher cache, (path, manifest): its stored crops and embeddings.
    self.cache = cache
    self.k = int(cache[1]["augment"]["augmentations"]) if cache else int(
        cfg.get("augmentations", 0))
    if self.k and reader is not None:
      raise shards.DataError("data.augmentations > 0 (crops drawn from each sample's key) "
                             f"reads webdataset or tfrecord shards, not data.kind={self.kind!r}; "
                             "set data.augmentations=0.")
    self.widths = [t["embed_dim"] for t in cache[1]["teachers"]] if cache else None
    self.extra = sample_cache.extra_fields(self.widths) if self.k else []
    self.process_index, self.process_count = process_index, process_count
    self.state = {"epoch": 0, "window": 0, "offset": 0, "used": 0,
                  "skipped": {r: 0 for r in shards.REASONS}}
    self._it = None
    self._stalled_batch = None
    self._pieces: list = []  # the tail as the running dataset() started from it

  # -- state -----------------------------------------------------------------------------
  def get_state(self) -> dict:
    return {**self.state, "skipped": dict(self.state["skipped"])}

  def set_state(self, state: dict) -> None:
    """A position of this process, or {"hosts": [...]}: the positions of a run with
    another number of processes, re-dealt (redeal.py)."""
    if "hosts" in state:
      state = self._resized(state["hosts"])
    if not redeal.is_position(state):
      raise shards.DataError("the checkpoint's input position is not one of sharded input "
                             "(epoch, window, offset); resume with the data config that "
                             "saved it, or start a new workdir.")
    skipped = {r: int(state.get("skipped", {}).get(r, 0)) for r in shards.REASONS}
    self.state = {
        "epoch": int(state["epoch"]),
        "window": int(state["window"]),
        "offset": int(state["offset"]),
        "used": int(state.get("used", 0)),
        "skipped": skipped
    }
    if state.get("resized"):
      self.state["resized"] = True
    if state.get("tail"):
      self.state["tail"] = [[int(v) for v in p] for p in state["tail"]]
    self._it = None
    self._stalled_batch = None

  def _resized(self, hosts: list) -> dict:
    per = int(self.cfg.shards_per_window)
    args = (len(self.units), per)
    state = redeal.resized_state(hosts, self.process_index, self.process_count, *args)
    if self.process_index == 0:
      logging.warning("%s", redeal.summary(hosts, self.process_count, *args))
    return state

  # -- the tf.data graph -----------------------------------------------------------------
  def _read_unit(self, path, epoch):
    if self.reader is not None:
      return self.reader(path)
    fn = shards.READERS[self.kind]
    args = (path, int(self.cfg.min_image_size), int(self.cfg.max_image_pixels),
            str(self.cfg.caption_key))
    if not self.k:
      return tf.data.Dataset.from_generator(lambda *a: shards.in_chunks(fn, *a),
                                            output_signature=shards.CHUNK_SIGNATURE,
                                            args=args).unbatch()
    sig = shards.CHUNK_SIGNATURE + tuple(
        tf.TensorSpec((None,) + shape, dtype) for _, shape, dtype in self.extra)
    return tf.data.Dataset.from_generator(self._annotated, output_signature=sig,
                                          args=args + (epoch,)).unbatch()

  def _annotated(self, path, min_size, max_pixels, caption_key, epoch):
    """A shard's record chunks with the key-derived fields (sample_cache.annotate)."""
    fn = shards.READERS[self.kind]
    path = path.decode() if isinstance(path, bytes) else path
    sidecar = None
    if self.cache:
      sidecar = sample_cache.Sidecar.read(
          storage.join(self.cache[0], sample_cache.sidecar_name(path)), len(self.widths))
    yield from sample_cache.annotate(
        shards.in_chunks(fn, path, min_size, max_pixels, caption_key), epoch=int(epoch),
        seed=int(self.cfg.seed), k=self.k, sidecar=sidecar, widths=self.widths,
        not_cached=shards.CODE["not_cached"])

  def _window(self, piece, epoch, window, paths, skip):
    per = int(self.cfg.shards_per_window)
    ds = tf.data.Dataset.from_tensor_slices(paths).interleave(
        lambda p: self._read_unit(p, epoch),
        cycle_length=per,
        block_length=1,
        num_parallel_calls=per,
        deterministic=True)
    ds = ds.shuffle(int(self.cfg.shuffle_buffer), seed=_fingerprint(self.cfg.seed, epoch, window))
    ds = ds.enumerate().skip(skip)
    return ds.map(
        lambda i, r: {
            "key": r[0],
            "image": r[1],
            "caption": r[2],
            "reason": r[3],
            "epoch": epoch,
            "window": window,
            "index": i,
            "piece": piece,
            **{name: r[4 + j] for j, (name, _, _) in enumerate(self.extra)}
        })

  def _windows(self):
    """(piece, epoch, window, paths, n, skip): the tail's pieces (piece = their place
    in it), then this process's own deal (piece -1)."""
    s, seed = self.state, int(self.cfg.seed)
    per = int(self.cfg.shards_per_window)
    pad = lambda paths: np.array(paths + [""] * (per - len(paths)), object)
    for p, (count, index, e, w, skip) in enumerate(self._pieces):
      mine = shards.host_units(self.units, seed, e, index, count)
      paths = mine[w * per:(w + 1) * per]
      yield p, e, w, pad(paths), len(paths), skip
    for e, w, paths in shards.windows(self.units, seed, per, self.process_index,
                                      self.process_count, s["epoch"], s["window"]):
      skip = s["offset"] if (e, w) == (s["epoch"], s["window"]) else 0
      yield -1, e, w, pad(paths), len(paths), skip

  def _caption(self, r):
    """Picks one of several captions (TFDS), repairs non-UTF-8 ones (U+FFFD) and flags
    them; flags empty ones."""
    caption = parts = r["caption"]
    if parts.shape.rank == 1:  # TFDS: a vector of the image's captions (maybe empty)
      seed = tf.stack([_fingerprint(self.cfg.seed + 1, r["epoch"], r["window"]), r["index"]])
      pick = tf.random.stateless_uniform([], seed, 0, tf.maximum(tf.size(parts), 1), tf.int32)
      caption = tf.cond(tf.size(parts) > 0, lambda: parts[pick], lambda: tf.constant(""))
    fixed, bad_utf8, reason = shards.repair_caption(caption, r["reason"])
    return dict(r, caption=fixed, reason=reason, bad_utf8=bad_utf8)

  def _with_heartbeats(self, ds, every: int):
    """A heartbeat record after every `every` records. Heartbeats are never decoded or
    counted; they reach the end of the pipeline only when `every` records in a row
    gave no usable sample (the `stall` flag). Without them a stream in which every
    record is filtered out (all captions missing, all images broken) would never
    yield a batch: the consumer would wait forever on a busy CPU."""
    beat = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()}
    beat["reason"] = tf.constant(_BEAT, ds.element_spec["reason"].dtype)
    choice = tf.data.Dataset.range(every + 1).map(lambda i: tf.cast(i // every, tf.int64))
    return tf.data.Dataset.choose_from_datasets(
        [ds, tf.data.Dataset.from_tensors(beat).repeat()], choice.repeat())

  def _decode_record(self, r):
    """Decodes and augments a record; a heartbeat passes with a blank image."""
    blank = lambda: dict(r, image=tf.zeros([self.image_size] * 2 + [3], tf.float32))
    return tf.cond(tf.equal(r["reason"], _BEAT), blank, lambda: dict(r, **self._decode(r)))

  def _box_of(self, r):
    """(h, w) → the record's crop box: drawn from its position (data.augmentations=0),
    from its key and the epoch's draw, or replayed from the teacher cache."""
    scale = (float(self.cfg.crop_scale_min), float(self.cfg.crop_scale_max))
    ratio = (float(self.cfg.crop_ratio_min), float(self.cfg.crop_ratio_max))
    if "box" in r:
      return lambda h, w: r["box"]
    if self.k:
      seed = augment.key_seed(int(self.cfg.get("augment_seed", 0)), r["aug"], r["key_hash"])
    else:
      seed = tf.stack([_fingerprint(self.cfg.seed, r["epoch"], r["window"]), r["index"]])
    return lambda h, w: augment.crop_box(seed, h, w, scale, ratio)

  def _decode(self, r):
    # jpeg_scale 1: the rule, PIL's pixels as evaluation decodes them; > 1 (opt-in):
    # JPEGs decoded at reduced DCT scale (augment.decode_for_crop).
    pixels, box, h, w = augment.decode_for_crop(r["image"], self._box_of(r), self.image_size,
                                                 self.jpeg_scale)
    crop = lambda: augment.crop(pixels, box, self.image_size)
    reason = tf.where(
        tf.minimum(h, w) < self.cfg.min_image_size, shards.CODE["tiny_image"],
        tf.where(
            tf.cast(h, tf.int64) * tf.cast(w, tf.int64) > self.cfg.max_image_pixels,
            shards.CODE["huge_image"], 0))
    image = tf.cond(
        tf.equal(reason, 0), crop, lambda: tf.zeros([self.image_size] * 2 + [3], tf.float32))
    out = {k: r[k] for k in ("key", "caption", "epoch", "window", "index", "piece", "counts",
                             "n_ok") + self._teacher_fields()}
    return dict(out, image=image, reason=reason)

  def _teacher_fields(self) -> tuple:
    return tuple(n for n, _, _ in self.extra if n.startswith("teacher_"))

  def dataset(self) -> tf.data.Dataset:
    s = self.state
    self._pieces = [list(p) for p in s.get("tail", [])]  # records name their piece by place
    per = int(self.cfg.shards_per_window)
    scalar = tf.TensorSpec((), tf.int64)
    sig = (scalar, scalar, scalar, tf.TensorSpec((per,), tf.string), scalar, scalar)
    ds = tf.data.Dataset.from_generator(self._windows, output_signature=sig)
    ds = ds.flat_map(lambda piece, e, w, p, n, skip: self._window(piece, e, w, p[:n], skip))
    ds = ds.map(self._caption)
    stall_after = int(self.cfg.stall_records)
    if stall_after > 0:
      ds = self._with_heartbeats(ds, stall_after)

    def count_pre(c, r):  # cumulative counts up to and including this record
      c_counts, c_ok, c_seen = c
      real = tf.cast(tf.not_equal(r["reason"], _BEAT), tf.int64)
      hit = tf.one_hot(r["reason"], _N, dtype=tf.int64) + tf.cast(r["bad_utf8"], tf.int64) * \
          tf.one_hot(shards.CODE["bad_utf8"], _N, dtype=tf.int64)
      c_counts = c_counts + hit * real
      c_ok = c_ok + tf.cast(tf.equal(r["reason"], 0), tf.int64)
      c_seen = c_seen + real
      return (c_counts, c_ok, c_seen), dict(r, counts=c_counts, n_ok=c_ok, seen=c_seen)

    start = np.zeros(_N, np.int64)
    for reason, n in s["skipped"].items():
      start[shards.CODE[reason]] = n
    zero = tf.constant(0, tf.int64)
    ds = ds.scan((tf.constant(start), zero, zero), count_pre)
    ds = ds.filter(lambda r: tf.logical_or(tf.equal(r["reason"], 0), tf.equal(r["reason"], _BEAT)))
    # A JPEG that does not decode raises inside the map; ignore_errors drops exactly
    # those (the readers never raise), and the scan below counts them.
    ds = ds.map(
        self._decode_record, num_parallel_calls=int(self.cfg.num_parallel_calls),
        deterministic=True).ignore_errors()

    def count_post(c, r):
      c_counts, c_arrived, last_usable = c
      beat = tf.equal(r["reason"], _BEAT)
      real = tf.cast(tf.logical_not(beat), tf.int64)
      c_counts = c_counts + tf.one_hot(r["reason"], _N, dtype=tf.int64) * real
      c_arrived = c_arrived + real
      corrupt = r["n_ok"] - c_arrived  # passed the reader, never reached this scan
      counts = r["counts"] + c_counts + corrupt * tf.one_hot(
          shards.CODE["corrupt_image"], _N, dtype=tf.int64)
      last_usable = tf.where(tf.equal(r["reason"], 0), r["seen"], last_usable)
      run = r["seen"] - last_usable  # records read since the last usable one
      stall = tf.logical_and(beat, run >= stall_after)
      return (c_counts, c_arrived, last_usable), dict(r, counts=counts, stall=stall,
                                                      stall_run=run)

    ds = ds.scan((tf.zeros(_N, tf.int64), zero, zero), count_post)
    ds = ds.filter(lambda r: tf.logical_or(tf.equal(r["reason"], 0), r["stall"]))
    keep = ("key", "image", "caption", "epoch", "window", "index", "piece", "counts", "stall",
            "stall_run") + self._teacher_fields()
    ds = ds.map(lambda r: {k: r[k] for k in keep})
    # The stream ends with its first stall row, so that row's (partial) batch comes
    # out at once instead of waiting for a batch's worth of stalls.
    ds = ds.scan(tf.constant(False), lambda ended, r: (tf.logical_or(ended, r["stall"]),
                                                       dict(r, after_stall=ended)))
    ds = ds.take_while(lambda r: tf.logical_not(r["after_stall"]))
    ds = ds.map(lambda r: {k: r[k] for k in keep})
    ds = ds.batch(self.local_batch, drop_remainder=stall_after <= 0)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(0, int(self.cfg.threads))
    return ds.with_options(options).prefetch(AUTOTUNE)

  # -- iteration ---------------------------------------------------------------------------
  def next_batch(self) -> dict[str, np.ndarray]:
    """The next batch with its sample keys and captions (tests and tools)."""
    if self._stalled_batch is not None:
      return self._stalled_batch
    if self._it is None:
      self._it = self.dataset().as_numpy_iterator()
    b = next(self._it)
    counts = b["counts"][-1]
    skipped = {r: int(counts[shards.CODE[r]]) for r in shards.REASONS}
    if b["stall"].any():
      return self._stall(b, skipped)
    self.state = self._after(b, skipped)
    captions = [c.decode("utf-8") for c in b["caption"]]
    return {
        "images": b["image"],
        "tokens": tokenizer.tokenize(captions, self.context_length),
        "keys": [k.decode("utf-8", "replace") for k in b["key"]],
        "captions": captions,
        **sample_cache.teacher_batch(b, self.widths)
    }

  def _after(self, b, skipped: dict) -> dict:
    """The state after batch `b`: the position after its last sample, in the tail
    (the pieces from that one on) or in this process's own deal."""
    piece, after = int(b["piece"][-1]), int(b["index"][-1]) + 1
    used = self.state["used"] + len(b["key"])
    if piece >= 0:
      tail = [list(p) for p in self._pieces[piece:]]
      tail[0][4] = after
      return dict(self.state, used=used, skipped=skipped, tail=tail)
    state = {
        "epoch": int(b["epoch"][-1]),
        "window": int(b["window"][-1]),
        "offset": after,
        "used": used,
        "skipped": skipped
    }
    return dict(state, resized=True) if self.state.get("resized") else state

  def _stall(self, b, skipped: dict) -> dict:
    """No usable sample in `stall_records` records: the state says so (the loop stops
    every process at its next agreement point, see pipeline.check_input) and, until
    then, this source returns one blank batch without reading further."""
    run = int(b["stall_run"][np.argmax(b["stall"])])
    self.state = dict(self.state, skipped=skipped, stalled=run)
    n = self.local_batch
    self._stalled_batch = {
        "images": np.zeros((n,) + b["image"].shape[1:], b["image"].dtype),
        "tokens": tokenizer.tokenize([""] * n, self.context_length),
        "keys": [""] * n,
        "captions": [""] * n,
        **{k: (tuple(np.zeros_like(x) for x in v) if isinstance(v, tuple) else np.zeros_like(v))
           for k, v in sample_cache.teacher_batch(b, self.widths).items()}
    }
    self.close()
    return self._stalled_batch

  def close(self) -> None:
    """Ends the tf.data iterator now, while the interpreter is alive.

    Why it matters: the shard readers are Python generators run by tf.data
    (`from_generator`) on tf.data's own threads. An iterator still alive at
    interpreter shutdown is destroyed by the garbage collector after Python has
    started finalizing; its destructor waits for in-flight reader calls, which can no
    longer take the GIL, so the process hangs after all work is done. Deleting it
    here runs that teardown while the readers can still finish.
    """
    it, self._it = self._it, None
    if it is not None:
      del it
      gc.collect()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = self.next_batch()
    return {k: v for k, v in b.items() if k not in ("keys", "captions")}
