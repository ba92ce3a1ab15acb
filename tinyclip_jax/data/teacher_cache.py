"""Teacher-embedding cache: the teacher's normalized image and text embeddings of
every training batch, computed once (`python -m tinyclip_jax.cache_teacher`) and
read back by training runs with `teacher.cache=PATH`, which then skip the teacher
forward pass.

The input pipeline is a pure function of its config and seed (augmentation
included), so batch s of a run is batch s of the run that built the cache: the
cache is indexed by step. A manifest records what the embeddings depend on — the
teacher (config and a digest of its weights), the data config with its seed, the
image decoding rule's version (tinyclip_jax.data.decode) and data.jpeg_scale, the
global batch, image size, context length and process count — and a run whose own
values differ is refused, naming both.

Layout: PATH/cache.json (written last: its presence means complete) and
PATH/p{process:03d}-{chunk:06d}.safetensors, each holding `chunk` steps of that
process's rows ("image", "text": (steps·rows, E)) as bfloat16 bits in uint16, or
as float32 when built with --dtype=float32 (exact replay, twice the bytes).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from tinyclip_jax import faults, storage
from tinyclip_jax.data import decode as image_decode

MANIFEST = "cache.json"
FORMAT = 1
# Data fields that change speed, not content: a cache stays valid across them.
NEUTRAL_DATA_FIELDS = ("prefetch", "num_parallel_calls")


class CacheError(ValueError):
  """A cache that does not fit the run, or is not there."""


def teacher_digest(params: Mapping[str, Any]) -> str:
  """sha256 over the teacher's weights (paths, shapes, dtypes and bytes), on the host."""
  h = hashlib.sha256()
  for path, x in sorted(jax.tree_util.tree_leaves_with_path(params),
                        key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def describe(config, teacher_config, digest: str) -> dict:
  """What the cached embeddings depend on, for the manifest and for comparing. The
  decoding is the rule's version and data.jpeg_scale (reduced-DCT JPEG decoding, 1 =
  off), kept out of "data" so that caches from before the field match runs at 1."""
  data = {k: v for k, v in config.data.to_dict().items()
          if k not in NEUTRAL_DATA_FIELDS and k != "jpeg_scale"}
  return {"teacher": {"config": teacher_config.to_dict(), "digest": digest},
          "data": json.loads(json.dumps(data, default=str)),
          "decode_version": image_decode.DECODE_VERSION,
          "jpeg_scale": int(config.data.get("jpeg_scale", 1)),
          "batch_size": int(config.batch_size),
          "process_count": jax.process_count()}


def first_difference(want: Any, got: Any, path: str = "") -> str | None:
  if isinstance(want, dict) and isinstance(got, dict):
    for k in sorted(set(want) | set(got)):
      d = first_difference(want.get(k), got.get(k), f"{path}.{k}" if path else k)
      if d:
        return d
    return None
  return None if want == got else f"{path} (cache: {got!r}; this run: {want!r})"


DTYPES = ("bfloat16", "float32")


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
  """float32 as stored: bfloat16 bits in uint16 (safetensors' numpy side has no bf16)."""
  x = np.asarray(x, np.float32)
  return x.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else x


def decode(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return (x.view(ml_dtypes.bfloat16) if x.dtype == np.uint16 else x).astype(np.float32)


class Writer:
  """Appends one step's local rows at a time; `close` writes this process's last
  chunk, and process 0 the manifest once everything is written."""

  def __init__(self, path: str, chunk: int, dtype: str = "bfloat16"):
    self.path = path
    self.chunk = chunk
    self.dtype = dtype
    self.rows: list[tuple[np.ndarray, np.ndarray]] = []
    self.index = 0

  def add(self, image: np.ndarray, text: np.ndarray) -> None:
    self.rows.append((encode(image, self.dtype), encode(text, self.dtype)))
    if len(self.rows) == self.chunk:
      self._flush()

  def _flush(self) -> None:
    if not self.rows:
      return
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
    blob = save({"image": np.concatenate([r[0] for r in self.rows]),
                 "text": np.concatenate([r[1] for r in self.rows])})
    name = f"p{jax.process_index():03d}-{self.index:06d}.safetensors"
    storage.write_bytes(storage.join(self.path, name), blob)
    self.rows, self.index = [], self.index + 1

  def close(self, manifest: dict) -> None:
    self._flush()
    from tinyclip_jax import parallel  # pylint: disable=import-outside-toplevel
    parallel.barrier("teacher_cache")
    if jax.process_index() == 0:  # the manifest is the commit marker: written last
      faults.in_write("teacher_cache")
      storage.write_json(storage.join(self.path, MANIFEST), manifest, sort_keys=True)


def load_manifest(path: str) -> dict:
  p = storage.join(path, MANIFEST)
  if not storage.exists(p):
    raise CacheError(f"teacher.cache {path} holds no complete cache ({MANIFEST} is missing); "
                     "build one with `python -m tinyclip_jax.cache_teacher --config=... "
                     f"--out={path}`.")
  try:  # a half-copied or hand-edited manifest is bad input, not a crash
    manifest = storage.read_json(p)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise CacheError(f"teacher.cache {path}: {MANIFEST} is not readable JSON "
                     f"({' '.join(str(e).split())}); rebuild the cache.") from e
  if not isinstance(manifest, dict):
    raise CacheError(f"teacher.cache {path}: {MANIFEST} holds a {type(manifest).__name__}, "
                     "not a cache manifest; rebuild the cache.")
  return manifest


def check(manifest: dict, expected: dict, steps: int, path: str) -> None:
  """Refuses a cache built for another teacher, data, batch or process count, or
  with fewer steps than the run needs."""
  if manifest.get("format") != FORMAT:
    raise CacheError(f"teacher.cache {path} has format {manifest.get('format')} but this "
                     f"version reads {FORMAT}; rebuild it.")
  built, now = manifest.get("decode_version"), expected["decode_version"]
  if built != now:
    built = built if built is not None else "1 (tf.io.decode_image; not recorded then)"
    raise CacheError(f"teacher.cache {path} was built from images decoded by rule version "
                     f"{built} but this run decodes them by rule version {now} "
                     "(tinyclip_jax/data/decode.py); rebuild the cache.")
  built, now = manifest.get("jpeg_scale", 1), expected.get("jpeg_scale", 1)
  if built != now:
    raise CacheError(f"teacher.cache {path} was built from JPEGs decoded with "
                     f"data.jpeg_scale={built} but this run sets data.jpeg_scale={now}, which "
                     "decodes other pixels; rebuild the cache or set "
                     f"data.jpeg_scale={built}.")
  for key in ("teacher", "data", "batch_size", "process_count"):
    diff = first_difference(expected[key], manifest.get(key), key)
    if diff:
      raise CacheError(f"teacher.cache {path} was built for another run: {diff}; rebuild the "
                       "cache for this config or drop teacher.cache.")
  if manifest["steps"] < steps:
    raise CacheError(f"teacher.cache {path} holds {manifest['steps']} steps but the run needs "
                     f"{steps}; rebuild it with --steps={steps} or lower total_steps.")


def check_input(state: dict, path: str) -> None:
  """Refuses to replay the cache into an input resumed on another number of processes
  (data/redeal.py): its batches differ from those the cache was built from."""
  if state.get("resized"):
    raise CacheError(f"teacher.cache {path} holds the teacher's embeddings of the batches "
                     "of a run that never changed its number of processes, but this run's "
                     "input was resumed on another number, so its batches differ; drop "
                     "teacher.cache to compute the teacher.")


class Reader:
  """This process's cached rows of step s (1-based), chunk by chunk."""

  def __init__(self, path: str, manifest: dict):
    self.path = path
    self.chunk = int(manifest["chunk"])
    self.rows = int(manifest["batch_size"]) // int(manifest["process_count"])
    self.loaded: tuple[int, dict] | None = None

  def step(self, s: int) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
    c, i = divmod(s - 1, self.chunk)
    if self.loaded is None or self.loaded[0] != c:
      name = f"p{jax.process_index():03d}-{c:06d}.safetensors"
      self.loaded = (c, load(storage.read_bytes(storage.join(self.path, name))))
    arrays = self.loaded[1]
    sl = slice(i * self.rows, (i + 1) * self.rows)
    return decode(arrays["image"][sl]), decode(arrays["text"][sl])


class CachedTeacher:
  """Wraps a batch source: each batch gains "teacher_image" and "teacher_text", the
  cached embeddings of the same step; the source's state passes through."""

  def __init__(self, source, reader: Reader, start_step: int, local_rows: int):
    self.source, self.reader, self.next_step = source, reader, start_step + 1
    self.local_rows = local_rows

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state):
    self.source.set_state(state)

  def close(self):
    close = getattr(self.source, "close", None)
    if close is not None:
      close()

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.source))
    image, text = self.reader.step(self.next_step)
    if image.shape[0] != self.local_rows:
      raise CacheError(f"the cache holds {image.shape[0]} rows for step {self.next_step} but "
                       f"this process's batch has {self.local_rows}; rebuild the cache.")
    batch["teacher_image"], batch["teacher_text"] = image, text
    self.next_step += 1
    return batch
