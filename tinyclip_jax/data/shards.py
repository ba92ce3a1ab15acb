"""Shard files: pattern expansion, per-epoch order, and readers that turn one shard
into raw records (key, image bytes, caption bytes, reason) without ever raising on
bad data.

A record whose `reason` is not 0 is a bad sample: it travels through the pipeline
as a marker so that it is counted (`skipped/<reason>`) at the exact position where
it was read, then dropped. The readers are Python generators (run by
`tf.data.Dataset.from_generator`, several shards read in parallel); they open files
through tinyclip_jax.storage, so shards may live on `gs://` (tf.data's own file
reading could not be pointed at a GCS emulator or another endpoint).
"""
from __future__ import annotations

import io
import itertools
import json
import posixpath
import re
import tarfile
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image

from tinyclip_jax import storage

# Why a sample was dropped (or, for bad_utf8, repaired). Code = index + 1; 0 = good.
REASONS = ("corrupt_image", "missing_image", "empty_caption", "missing_caption", "bad_utf8",
           "tiny_image", "huge_image", "truncated_tar", "truncated_tfrecord", "unreadable_shard",
           "not_cached")  # not_cached: no row in the per-sample teacher cache
CODE = {r: i + 1 for i, r in enumerate(REASONS)}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_KEY = "caption"  # of KEY.json, read when a sample has no KEY.txt
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")


class DataError(ValueError):
  """A data pattern or dataset that cannot be read; the message names it."""


def expand_braces(pattern: str) -> list[str]:
  """'a/{000..002}.tar' → a/000.tar, a/001.tar, a/002.tar (zero padding kept, as the
  webdataset/braceexpand convention); '{x,y}' alternatives too."""
  m = _BRACE.search(pattern)
  if not m:
    return [pattern]
  if m.group(1) is not None:
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    options = m.group(3).split(",")
  head, tail = pattern[:m.start()], pattern[m.end():]
  return [p for o in options for p in expand_braces(head + o + tail)]


def resolve(pattern: str, what: str = "data.train") -> list[str]:
  """Every file of a brace/glob pattern, sorted. A brace-expanded name that does not
  exist is an error naming it: a missing shard would silently change the data."""
  if not pattern:
    raise DataError(f"{what} is empty; give a shard pattern such as "
                    "'/data/laion/{00000..41455}.tar' or 'gs://bucket/cc3m/*.tfrecord'.")
  files, named = [], []
  for part in (p for p in pattern.split("::") if p):  # several patterns joined by '::'
    for name in expand_braces(part):
      if any(c in name for c in "*?["):
        matched = storage.glob(name)
        if not matched:
          raise DataError(f"{what} pattern {name!r} matches no file; check the path.")
        files.extend(matched)
      else:
        named.append(name)
  listed: dict[str, set] = {}  # one listing per folder, not one request per shard
  missing = []
  for name in named:
    folder, base = posixpath.split(name)
    if folder not in listed:
      listed[folder] = set(storage.listdir(folder))
    (files if base in listed[folder] else missing).append(name)
  if missing:
    more = f" (and {len(missing) - 1} more of {len(named)})" if len(missing) > 1 else ""
    raise DataError(f"{what} shard {missing[0]} does not exist{more}; fix the pattern or "
                    "restore the shards.")
  return sorted(set(files))


def host_units(units: list, seed: int, epoch: int, process_index: int, process_count: int) -> list:
  """This process's units (shards) for `epoch`: one permutation of all units from
  (seed, epoch), the same on every host, dealt round-robin to the hosts."""
  order = np.random.default_rng([seed, epoch]).permutation(len(units))
  return [units[i] for i in order[process_index::process_count]]


def _record(key, image, caption, reason=0):
  return key, image or b"", caption or b"", reason


def check_header(image: bytes, min_size: int, max_pixels: int) -> int:
  """Reason code from the image header alone (no decode): corrupt, tiny or huge."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(image)) as im:
        w, h = im.size
  except Image.DecompressionBombError:
    return CODE["huge_image"]
  except Exception:  # noqa: BLE001 - PIL raises many types on garbage
    return CODE["corrupt_image"]
  if min(w, h) < min_size:
    return CODE["tiny_image"]
  if w * h > max_pixels:
    return CODE["huge_image"]
  return 0


def json_caption(raw: bytes, caption_key: str) -> bytes | None:
  """The caption under `caption_key` ('a/b' for nested keys) of a sample's JSON
  metadata (img2dataset writes {"caption": ...}), or None when it has none."""
  try:
    value = json.loads(raw)
  except ValueError:
    return None
  for part in caption_key.split("/"):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value.encode("utf-8") if isinstance(value, str) else None


def _sample(key: str, parts: dict, min_size: int, max_pixels: int,
            caption_key: str = DEFAULT_CAPTION_KEY):
  """A sample's record: the caption is KEY.txt, or, without one, the JSON's
  `caption_key` field."""
  image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
  caption = parts.get("txt")
  if caption is None and "json" in parts and caption_key:
    caption = json_caption(parts["json"], caption_key)
  if image is None:
    return _record(key, None, caption, CODE["missing_image"])
  if caption is None:
    return _record(key, None, None, CODE["missing_caption"])
  return _record(key, image, caption, check_header(image, min_size, max_pixels))


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def read_tar(path, min_size, max_pixels, caption_key=DEFAULT_CAPTION_KEY):
  """Samples of a webdataset tar (consecutive members sharing a key: KEY.jpg, KEY.txt,
  KEY.json, ...). Streamed, so a truncated tar yields its complete samples, then one
  `truncated_tar` marker."""
  path, caption_key = _text(path), _text(caption_key)
  key, parts = None, {}
  try:
    with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, base = posixpath.split(member.name)
        stem, _, ext = base.partition(".")
        name = posixpath.join(folder, stem)
        if name != key and key is not None:  # before reading on: complete samples first
          yield _sample(key, parts, min_size, max_pixels, caption_key)
          parts = {}
        key = name
        parts[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
      yield _sample(key, parts, min_size, max_pixels, caption_key)
  except (tarfile.TarError, EOFError) as e:
    yield _record(f"{path}:{key}", None, None, CODE["truncated_tar"])
    tf.get_logger().warning("truncated tar %s after sample %s: %s", path, key, e)
  except Exception as e:  # noqa: BLE001 - counted and logged, never a silent crash
    yield _record(path, None, None, CODE["unreadable_shard"])
    tf.get_logger().warning("cannot read shard %s: %s", path, e)


def read_tfrecord(path, min_size, max_pixels, caption_key=DEFAULT_CAPTION_KEY):
  """Samples of an img2dataset TFRecord shard (tf.train.Example with `key`, `jpg`
  (or another image extension) and `txt` (or `json`) bytes features)."""
  path, caption_key = _text(path), _text(caption_key)
  count = 0
  try:
    records = (_url_records(path) if storage.is_url(path)
               else tf.compat.v1.io.tf_record_iterator(path))
    for raw in records:
      feats = tf.train.Example.FromString(raw).features.feature
      parts = {k: v.bytes_list.value[0] for k, v in feats.items() if v.bytes_list.value}
      key = parts.pop("key", f"{path}:{count}".encode())
      key = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
      count += 1
      yield _sample(key, parts, min_size, max_pixels, caption_key)
  except tf.errors.DataLossError as e:
    yield _record(f"{path}:{count}", None, None, CODE["truncated_tfrecord"])
    tf.get_logger().warning("truncated tfrecord %s after %d records: %s", path, count, e)
  except Exception as e:  # noqa: BLE001
    yield _record(path, None, None, CODE["unreadable_shard"])
    tf.get_logger().warning("cannot read shard %s: %s", path, e)


def _url_records(path: str):
  """TFRecord payloads of a gs:// file read through storage (TF's reader would use its
  own GCS client); lengths are checked, CRCs are not (GCS checksums the object)."""
  import struct  # pylint: disable=import-outside-toplevel
  with storage.open_read(path) as f:
    while True:
      head = f.read(12)
      if not head:
        return
      if len(head) < 12:
        raise tf.errors.DataLossError(None, None, "truncated record header")
      (n,) = struct.unpack("<Q", head[:8])
      body = f.read(n + 4)
      if len(body) < n + 4:
        raise tf.errors.DataLossError(None, None, "truncated record")
      yield body[:n]


READERS = {"webdataset": read_tar, "tfrecord": read_tfrecord}
RECORD_SIGNATURE = (tf.TensorSpec((), tf.string), tf.TensorSpec(
    (), tf.string), tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32))
CHUNK_SIGNATURE = tuple(tf.TensorSpec((None,), s.dtype) for s in RECORD_SIGNATURE)
CHUNK = 16  # records per call into Python: the per-call cost was ~45% of reading


def repair_caption(caption, reason):
  """(caption with non-UTF-8 bytes replaced by U+FFFD, whether any were, reason with
  empty captions flagged) — also what the per-sample teacher cache embeds."""
  fixed = tf.strings.unicode_transcode(
      caption, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
  bad_utf8 = tf.logical_and(tf.equal(reason, 0), tf.not_equal(fixed, caption))
  empty = tf.logical_and(
      tf.equal(reason, 0), tf.equal(tf.strings.length(tf.strings.strip(fixed)), 0))
  return fixed, bad_utf8, tf.where(empty, CODE["empty_caption"], reason)


def in_chunks(reader, *args, size: int = CHUNK):
  """A reader's records in order, `size` at a time as four lists (CHUNK_SIGNATURE), so
  that tf.data's `from_generator` crosses into Python once per chunk, not per record."""
  records = reader(*args)
  while True:
    chunk = list(itertools.islice(records, size))
    if not chunk:
      return
    yield tuple(list(field) for field in zip(*chunk))


def windows(units: list,
            seed: int,
            per_window: int,
            process_index: int,
            process_count: int,
            start_epoch: int = 0,
            start_window: int = 0):
  """Endless (epoch, window, unit list) of this host from a position on."""
  for epoch in itertools.count(start_epoch):
    mine = host_units(units, seed, epoch, process_index, process_count)
    chunks = [mine[i:i + per_window] for i in range(0, len(mine), per_window)]
    for w in range(start_window if epoch == start_epoch else 0, len(chunks)):
      yield epoch, w, chunks[w]
