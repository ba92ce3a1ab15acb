"""Metric writing: clu's TensorBoard + console writers, plus DIR/metrics.jsonl
(one JSON object per logged step) for scripts and plots. Only process 0 writes."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class JsonlWriter(interface.MetricWriter):
  """Appends {"step": s, **scalars} lines to a file; other summaries are ignored."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}) + "\n")

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


def truncate_jsonl(path: str, last_step: int) -> None:
  """On resume, drop lines logged after the restored checkpoint: the run replays them."""
  if not os.path.exists(path):
    return
  def step(line: str):
    try:
      return json.loads(line)["step"]
    except ValueError:  # the last line, cut off by a kill mid-write
      return None
  with open(path) as f:
    keep = [line for line in f if (s := step(line)) is not None and s <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  is_main = jax.process_index() == 0
  writers = [metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                  asynchronous=False)]
  if is_main and "://" not in workdir:
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  return metric_writers.MultiWriter(writers)
