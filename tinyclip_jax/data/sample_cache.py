"""Per-sample teacher cache (format 2): the teacher's normalized embeddings stored
with each sample of the training shards — of K crops of its image and of its caption
— so that any number of students, at any batch size, on any number of processes and
stages, distil without running the teacher (`python -m tinyclip_jax.cache_teacher
--augmentations=K`; read by runs with `teacher.cache=PATH`).

Crops. With `data.augmentations = K` a sample's K crops are drawn from seeds derived
from its key and `data.augment_seed` (augment.key_seed), never from its position in a
process's stream, and each epoch a run takes one of them, drawn from (data.seed,
epoch, key) (`draw`). Both depend on nothing a cluster changes, so a cache built once
replays on any process count, and the draw needs no state beyond the epoch that the
input position already holds (resume stays exact). The same crops are drawn without
a cache (the teacher then runs online): the exactness check of the cache.

Layout: PATH/cache.json (the manifest, written last: its presence means complete) and
one sidecar per data shard, PATH/shards/<shard file name>.safetensors, rows in the
shard's record order: `key_hash` int64 (N,), `ok` uint8 (N,) (0: the builder found
the sample unusable — tiny, huge, undecodable image, empty caption — training skips
it by its own reason), `box` int32 (N, K, 4) (top, left, height, width in the
full-size image), and per teacher m of the ensemble `image.m` (N, K, E_m) and
`text.m` (N, E_m), bfloat16 bits in uint16 or float32. safetensors because a shard's
arrays load in one read with no unpickling, from bytes fetched through the storage
layer (gs:// too), and numpy reads them zero-copy. Training streams the sidecars in
shard order beside the shards: a reader holds only the sidecars of the shards it is
reading (a window's worth), never a key → embedding map of the whole dataset.
"""
from __future__ import annotations

import hashlib
import posixpath
import struct
from typing import Iterator

import numpy as np

from tinyclip_jax import storage
from tinyclip_jax.data import decode as image_decode, teacher_cache

FORMAT = 2
MANIFEST = teacher_cache.MANIFEST
SIDECARS = "shards"
AUGMENT_FIELDS = ("augment_seed", "crop_scale_min", "crop_scale_max", "crop_ratio_min",
                  "crop_ratio_max", "jpeg_scale")
KINDS = ("webdataset", "tfrecord")  # record readers that see keys in Python


class CacheError(teacher_cache.CacheError):
  """A per-sample cache that does not fit the run, or is not there."""


def key_hash(key: str | bytes) -> int:
  """A sample key → signed 64-bit integer (blake2b), the same on every host."""
  if isinstance(key, str):
    key = key.encode("utf-8", "surrogateescape")
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


def draw(seed: int, epoch: int, khash: int, k: int) -> int:
  """Which of a sample's k crops the run uses in `epoch`: uniform, from (data.seed,
  epoch, key) only."""
  if k == 1:
    return 0
  h = hashlib.blake2b(struct.pack("<qqq", int(seed), int(epoch), int(khash)), digest_size=8)
  return int.from_bytes(h.digest(), "little") % k


def sidecar_name(shard: str) -> str:
  return posixpath.join(SIDECARS, posixpath.basename(shard.rstrip("/")) + ".safetensors")


def augmentation(data_cfg, image_size: int, k: int) -> dict:
  """What a sample's stored crops depend on (the manifest's "augment")."""
  out = {f: data_cfg.get(f, 1 if f == "jpeg_scale" else 0) for f in AUGMENT_FIELDS}
  out = {f: (int(v) if f in ("augment_seed", "jpeg_scale") else float(v)) for f, v in out.items()}
  return dict(out, augmentations=int(k), image_size=int(image_size),
              decode_version=image_decode.DECODE_VERSION)


def teachers_entry(members) -> list[dict]:
  """[(name, model config, host weights, scale)] → the manifest's "teachers"."""
  return [{"name": name, "config": cfg.to_dict(), "scale": float(scale),
           "digest": teacher_cache.teacher_digest(host)} for name, cfg, host, scale in members]


def is_sample_cache(manifest: dict) -> bool:
  return manifest.get("format") == FORMAT


def check(manifest: dict, augment: dict, teachers: list[dict], path: str) -> None:
  """Refuses a cache of other teachers or other crops; one sentence."""
  names = lambda ts: ", ".join(f"{t['name']} ({t['digest'][:12]})" for t in ts)
  got = manifest.get("teachers", [])
  diff = None
  if [t["name"] for t in got] != [t["name"] for t in teachers]:
    diff = "other members"
  for want, have in zip(teachers, got):
    diff = diff or teacher_cache.first_difference(want["config"], have["config"], f"{want['name']}.config")
    if not diff and want["digest"] != have["digest"]:
      diff = f"{want['name']}: other weights"
  if diff:
    raise CacheError(f"teacher.cache {path} holds the embeddings of teacher(s) {names(got)} "
                     f"but this run distils from {names(teachers)} ({diff}); build a cache for "
                     "this run's teacher(s) or set teacher.cache to theirs.")
  for key, want in augment.items():
    have = manifest["augment"].get(key)
    if have != want:
      field = "data.augmentations" if key == "augmentations" else (
          "the student's image size" if key == "image_size" else
          "the image decoding rule (tinyclip_jax/data/decode.py)" if key == "decode_version"
          else f"data.{key}")
      raise CacheError(f"teacher.cache {path} stores crops made with {field} = {have!r} but "
                       f"this run sets {want!r}; set it to {have!r} or build a cache with "
                       "this run's augmentation config.")


def check_input(manifest: dict, units: list[str], image_size: int, context_length: int,
                path: str) -> None:
  """The student's input is what the cache embedded, and every shard the run reads
  has a sidecar in the cache."""
  built = manifest["augment"]["image_size"]
  if built != image_size:
    raise CacheError(f"teacher.cache {path} embedded {built}-pixel crops but this run's "
                     f"student reads {image_size}-pixel images; build a cache for this "
                     "student's image size.")
  if manifest.get("context_length") != context_length:
    raise CacheError(f"teacher.cache {path} embedded captions tokenized to "
                     f"{manifest.get('context_length')} tokens but this run's student reads "
                     f"{context_length}; build a cache for this student's context length.")
  check_shards(manifest, units, path)


def check_shards(manifest: dict, units: list[str], path: str) -> None:
  """Every shard the run reads has a sidecar in the cache."""
  have = manifest.get("shards", {})
  missing = [u for u in units if posixpath.basename(u.rstrip("/")) not in have]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CacheError(f"teacher.cache {path} has no embeddings of shard {missing[0]}{more} "
                     "that data.train reads; build the cache over the same shards "
                     f"({len(have)} cached).")


class Sidecar:
  """One shard's rows, found by key (duplicate keys in a shard: in order)."""

  def __init__(self, arrays: dict, members: int):
    self.arrays, self.members = arrays, members
    self.rows: dict[int, list[int]] = {}
    for i, h in enumerate(arrays["key_hash"].tolist()):
      self.rows.setdefault(h, []).append(i)
    self.taken: dict[int, int] = {}

  @classmethod
  def read(cls, path: str, members: int) -> "Sidecar":
    """A sidecar that cannot be read (truncated, corrupt, gone since the run's check)
    holds no rows: its shard's samples are counted and skipped as not_cached. Raising
    instead would end the shard's reader inside tf.data, which drops it uncounted."""
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
    try:
      arrays = load(storage.read_bytes(path))
      arrays["key_hash"]  # pylint: disable=pointless-statement
    except (SafetensorError, OSError, ValueError, KeyError) as e:
      from absl import logging  # pylint: disable=import-outside-toplevel
      logging.warning("cannot read the teacher cache sidecar %s (%s); its shard's samples "
                      "are skipped as not_cached; rebuild the cache.", path,
                      " ".join(str(e).split()))
      arrays = {"key_hash": np.zeros(0, np.int64)}
    return cls(arrays, members)

  def take(self, khash: int) -> int | None:
    rows = self.rows.get(khash)
    n = self.taken.get(khash, 0)
    if rows is None or n >= len(rows):
      return None
    self.taken[khash] = n + 1
    return rows[n]


def extra_fields(members: list[int] | None) -> list[tuple[str, tuple, str]]:
  """(name, per-record shape, dtype) of the fields a reader adds to each record:
  the key's hash and the epoch's draw (data.augmentations > 0), and with a cache the
  stored box and each teacher's embeddings (`members`: their widths)."""
  out = [("key_hash", (), "int64"), ("aug", (), "int64")]
  if members is not None:
    out.append(("box", (4,), "int32"))
    out += [(f"teacher_image.{m}", (e,), "float32") for m, e in enumerate(members)]
    out += [(f"teacher_text.{m}", (e,), "float32") for m, e in enumerate(members)]
  return out


def annotate(chunks: Iterator[tuple], *, epoch: int, seed: int, k: int,
             sidecar: Sidecar | None, widths: list[int] | None,
             not_cached: int) -> Iterator[tuple]:
  """A shard reader's chunks (keys, images, captions, reasons) with the fields of
  `extra_fields` appended. With a sidecar, a usable record without a stored row
  gets reason `not_cached` (counted and skipped like other bad data)."""
  for keys, images, captions, reasons in chunks:
    n = len(keys)
    hashes = [key_hash(x) for x in keys]
    augs = [draw(seed, epoch, h, k) for h in hashes]
    extra = [np.array(hashes, np.int64), np.array(augs, np.int64)]
    if sidecar is not None:
      reasons = list(reasons)
      found, rows = [], []
      for i in range(n):
        row = None if reasons[i] else sidecar.take(hashes[i])
        if row is not None:
          found.append(i)
          rows.append(row)
        elif not reasons[i]:
          reasons[i] = not_cached
      a, draws = sidecar.arrays, np.asarray(augs)[found]
      box = np.zeros((n, 4), np.int32)
      images_t = [np.zeros((n, e), np.float32) for e in widths]
      texts_t = [np.zeros((n, e), np.float32) for e in widths]
      if found:  # one gather per chunk, not per record (an unreadable sidecar has none)
        box[found] = a["box"][rows, draws]
        for m in range(len(widths)):
          images_t[m][found] = teacher_cache.decode(a[f"image.{m}"][rows, draws])
          texts_t[m][found] = teacher_cache.decode(a[f"text.{m}"][rows])
      extra += [box, *images_t, *texts_t]
    yield (keys, images, captions, reasons, *extra)


def sidecar_counts(path: str) -> dict:
  """{"records", "cached"} of a written sidecar, from its header."""
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  ok = load(storage.read_bytes(path))["ok"]
  return {"records": int(len(ok)), "cached": int(ok.sum())}


def teacher_batch(b: dict, widths: list[int] | None) -> dict:
  """A batch's cached teacher embeddings: arrays for one teacher, tuples (the
  ensemble's order) for several; {} without a cache."""
  if not widths:
    return {}
  images = tuple(b[f"teacher_image.{m}"] for m in range(len(widths)))
  texts = tuple(b[f"teacher_text.{m}"] for m in range(len(widths)))
  if len(widths) == 1:
    return {"teacher_image": images[0], "teacher_text": texts[0]}
  return {"teacher_image": images, "teacher_text": texts}


def write_sidecar(path: str, shard: str, key_hashes: np.ndarray, ok: np.ndarray,
                  boxes: np.ndarray, images: list[np.ndarray], texts: list[np.ndarray],
                  dtype: str) -> None:
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  arrays = {"key_hash": np.asarray(key_hashes, np.int64), "ok": np.asarray(ok, np.uint8),
            "box": np.asarray(boxes, np.int32)}
  for m, (img, txt) in enumerate(zip(images, texts)):
    arrays[f"image.{m}"] = teacher_cache.encode(img, dtype)
    arrays[f"text.{m}"] = teacher_cache.encode(txt, dtype)
  blob = save(arrays, metadata={"shard": posixpath.basename(shard), "records": str(len(ok)),
                                "cached": str(int(np.sum(ok)))})
  storage.write_bytes(storage.join(path, sidecar_name(shard)), blob)
