"""Training input: per-host batches with a saved position, prefetched on a thread.

The position (the global index of the next example) is part of every checkpoint,
so a resumed run neither repeats nor skips examples. Each process makes only its
own rows of the global batch; the loop assembles global arrays from them.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import ml_collections
import numpy as np

from tinyclip_jax import preprocess, tokenizer
from tinyclip_jax.data import synthetic


class SyntheticPairs:
  """Image–caption pairs of the embedded generated dataset, batch by batch.

  Global batch b holds examples [b·B, (b+1)·B); process p makes its contiguous
  slice of rows, so the union over processes is the same for any host count.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, image_size: int, context_length: int,
               global_batch: int, process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} "
                       "processes; make it a multiple of the process count.")
    self.spec = synthetic.SyntheticSpec(image_size=image_size, seed=cfg.seed,
                                        max_objects=cfg.max_objects)
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
    return {"images": preprocess.normalize(raw["images"]),
            "tokens": tokenizer.tokenize(raw["captions"], self.context_length)}


def make_train_input(cfg: ml_collections.ConfigDict, image_size: int, context_length: int,
                     global_batch: int):
  if cfg.kind == "webdataset":
    raise ValueError("data.kind='webdataset' (sharded image-text input) is not built yet; "
                     "use data.kind='synthetic' until the webdataset/TFDS pipeline lands.")
  if cfg.kind != "synthetic":
    raise ValueError(f"data.kind {cfg.kind!r} is unknown; use 'synthetic'.")
  return SyntheticPairs(cfg, image_size, context_length, global_batch,
                        jax.process_index(), jax.process_count())


def prefetch(source, size: int) -> Iterator[tuple[dict, dict]]:
  """Yields (batch, source state after that batch) made `size` batches ahead on a
  thread; the state travels with its batch so a checkpoint saves the right position."""
  if size <= 0:
    while True:
      batch = next(source)
      yield batch, source.get_state()
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def work():
    try:
      while not stop.is_set():
        item = (next(source), source.get_state())
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except Exception as e:  # noqa: BLE001 - surfaced in the consumer
      q.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
