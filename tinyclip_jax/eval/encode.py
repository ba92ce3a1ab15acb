"""Encoders and batching, shared by the evaluation tasks and `tinyclip_jax.embed`.

An encoder maps a host batch to L2-normalized embeddings. `batched` runs one over
fixed-size batches (the last one zero-padded, so it compiles once); `on_mesh` shards
each batch over a mesh's data axes (each process supplies its rows), so the encoders
run on all devices of all hosts. Encoded images are decoded and preprocessed exactly
as CLIP evaluates (tinyclip_jax.preprocess) on a thread pool that lives for one batch.
"""
from __future__ import annotations

import functools
import os
from concurrent import futures
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from tinyclip_jax import parallel, preprocess, tokenizer
from tinyclip_jax.models import CLIP, CLIPConfig, l2_normalize, variables


@functools.lru_cache(maxsize=16)
def _jitted_encoders(config: CLIPConfig, dtype):
  """Compiled once per model config: periodic evals in training reuse them."""
  model = CLIP(config, dtype=dtype)
  # variables(): BatchNorm (ResNet) evaluates on the running statistics in the weights.
  img = jax.jit(lambda p, x: l2_normalize(model.apply(variables(p), x, method=CLIP.encode_image)))
  txt = jax.jit(lambda p, t: l2_normalize(model.apply(variables(p), t, method=CLIP.encode_text)))
  return img, txt


def encoders(config: CLIPConfig, params, dtype=jnp.float32):
  """(images → normalized embeds, tokens → normalized embeds) for these params."""
  img, txt = _jitted_encoders(config, dtype)
  return (lambda x: img(params, x)), (lambda t: txt(params, t))


def on_mesh(fn: Callable, mesh) -> Callable:
  """fn over a host batch, sharded over the mesh's data axes; returns numpy."""
  if mesh is None:
    return lambda x: np.asarray(fn(x))
  count, index = jax.process_count(), jax.process_index()

  def run(x):
    x = np.asarray(x)
    rows = len(x) // count
    arr = jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh, x.ndim), x[index * rows:(index + 1) * rows], x.shape)
    out = fn(arr)
    if count == 1:
      return np.asarray(out)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  return run


def mesh_batch(batch: int, mesh) -> int:
  """`batch` rounded up to whole rows per data-parallel device of the mesh."""
  if mesh is None:
    return batch
  per = parallel.batch_size_per_axis(mesh)
  return -(-batch // per) * per


def batched(fn: Callable, count: int, load: Callable[[int, int], np.ndarray],
            batch_size: int) -> np.ndarray:
  """fn over load(start, stop) in fixed-size batches; the last one is zero-padded so
  fn compiles once, and the padding rows are dropped from the result."""
  outs = []
  for start in range(0, count, batch_size):
    chunk = load(start, min(start + batch_size, count))
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    outs.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(outs)


def embed_array(fn: Callable, x: np.ndarray, batch: int) -> np.ndarray:
  """fn over the rows of an array in padded batches."""
  return batched(fn, len(x), lambda a, b: x[a:b], batch)


def embed_texts(encode_text: Callable, texts: list[str], context_length: int,
                batch: int) -> np.ndarray:
  return embed_array(encode_text, tokenizer.tokenize(texts, context_length), batch)


def decode(encoded: list[bytes], size: int) -> np.ndarray:
  """Encoded images → CLIP-preprocessed float32 (n, size, size, 3), decoded by
  tinyclip_jax.data.decode's rule (the one training uses)."""
  workers = max(1, min(16, os.cpu_count() or 1, len(encoded)))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:  # ended with the batch
    return np.stack(list(pool.map(lambda b: preprocess.load_image(bytes(b), size), encoded)))


def embed_encoded(encode_image: Callable, encoded: list[bytes], size: int,
                  batch: int) -> np.ndarray:
  """Embeddings of encoded images (one host batch of them at a time)."""
  return embed_array(encode_image, decode(encoded, size), batch)


def chunks(it: Iterable, n: int):
  """Lists of n items of `it` (the last one shorter): streams are embedded a batch at
  a time, so only embeddings are kept."""
  chunk = []
  for x in it:
    chunk.append(x)
    if len(chunk) == n:
      yield chunk
      chunk = []
  if chunk:
    yield chunk
