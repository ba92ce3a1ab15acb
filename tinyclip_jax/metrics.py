"""Metric writing: console logging, TensorBoard scalars, and one JSON object per logged
step for scripts and plots. Only process 0 writes files.

A local workdir gets clu's TensorBoard writer and WORKDIR/metrics.jsonl, appended a
line per logged step (`tail -f` works, and a line is on disk the moment it is logged).
Objects on GCS cannot be appended to, so a gs:// workdir gets segments instead: the
lines logged since the previous checkpoint are written as one object
metrics/<step>.jsonl when the loop saves the checkpoint of <step> (`checkpoint(step)`)
and at close, together with a TensorBoard event file of the same scalars, written
TF-free (TensorFlow's GCS client cannot be pointed at another server). After a kill,
every step up to the restored checkpoint is in the bucket; on resume `truncate`
drops what was logged after it (the run replays those steps).

`read_jsonl(path)` returns the whole run either way, one dict per logged step.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface

from tinyclip_jax import faults, storage, workdir as workdir_lib


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _line(step: int, scalars: Mapping[str, Any]) -> str:
  return json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}) + "\n"


class _Scalars(interface.MetricWriter):
  """Only scalars are written; other summaries are ignored."""

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


class JsonlWriter(_Scalars):
  """Appends {"step": s, **scalars} lines to a local file."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    with open(self._path, "a") as f:
      f.write(_line(step, scalars))


def _events(rows: list[tuple[float, dict]]) -> bytes:
  """A TensorBoard event file (TFRecord framing, no TensorFlow) of scalar rows."""
  from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
  from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  out = RecordWriter(buf)
  out.write(event_pb2.Event(wall_time=rows[0][0] if rows else time.time(),
                            file_version="brain.Event:2").SerializeToString())
  for wall, row in rows:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
    out.write(event_pb2.Event(wall_time=wall, step=row["step"],
                              summary=summary_pb2.Summary(value=values)).SerializeToString())
  return buf.getvalue()


def _write_segment(root: str, end: int, rows: list[tuple[float, dict]]) -> None:
  """metrics/<end>.jsonl, then its event file: each one atomic PUT. A kill between the
  two loses only TensorBoard's copy of those steps."""
  text = "".join(json.dumps({"_time": wall, **row}) + "\n" for wall, row in rows)
  storage.write_text(workdir_lib.metrics_segment(root, end), text)
  faults.in_write("metrics_segment")
  storage.write_bytes(workdir_lib.events_segment(root, end), _events(rows))


def _read_segment(path: str) -> list[tuple[float, dict]]:
  rows = []
  for line in storage.read_text(path).splitlines():
    if line.strip():
      row = json.loads(line)
      rows.append((row.pop("_time", 0.0), row))
  return rows


def _segments(root: str) -> list[tuple[int, str]]:
  folder = workdir_lib.metrics_segments(root)
  return sorted((int(n[:-len(".jsonl")]), storage.join(folder, n))
                for n in storage.match(folder, "*.jsonl") if n[:-len(".jsonl")].isdigit())


class SegmentWriter(_Scalars):
  """Buffers logged rows; writes them as one segment at each checkpoint and at close."""

  def __init__(self, root: str):
    self._root = root
    self._rows: list[tuple[float, dict]] = []

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._rows.append((time.time(), json.loads(_line(step, scalars))))

  def checkpoint(self, step: int) -> None:
    if self._rows:
      _write_segment(self._root, step, self._rows)
      self._rows = []

  def flush(self):
    if self._rows:
      self.checkpoint(self._rows[-1][1]["step"])

  def close(self):
    self.flush()


class RunWriter(metric_writers.MultiWriter):
  """clu's MultiWriter plus the two calls object storage needs: `checkpoint(step)`
  (the loop calls it right before it saves the checkpoint of `step`) and
  `truncate(step)` (on resume, before the first step)."""

  def __init__(self, writers, root: str, is_main: bool):
    super().__init__(writers)
    self._root, self._is_main = root, is_main

  def checkpoint(self, step: int) -> None:
    for w in self._writers:
      if isinstance(w, SegmentWriter):
        w.checkpoint(step)

  def truncate(self, step: int) -> None:
    if self._is_main:
      truncate(self._root, step)


def truncate(root: str, last_step: int) -> None:
  """On resume, drop what was logged after the restored checkpoint: the run replays it."""
  if not storage.is_url(root):
    truncate_jsonl(workdir_lib.metrics_jsonl(root), last_step)
    return
  for end, path in _segments(root):
    if end <= last_step:
      continue
    keep = [r for r in _read_segment(path) if r[1]["step"] <= last_step]
    storage.remove(workdir_lib.events_segment(root, end))
    storage.remove(path)
    if keep:  # a segment written before a checkpoint that did not complete
      _write_segment(root, keep[-1][1]["step"], keep)


def truncate_jsonl(path: str, last_step: int) -> None:
  """A local metrics.jsonl without the lines logged after `last_step`."""
  if not os.path.exists(path):
    return
  def step(line: str):
    try:
      return json.loads(line)["step"]
    except ValueError:  # the last line, cut off by a kill mid-write
      return None
  with open(path) as f:
    keep = [line for line in f if (s := step(line)) is not None and s <= last_step]
  storage.write_text(path, "".join(keep))


def read_jsonl(path: str) -> list[dict]:
  """Every logged step of a run, in order: `path` is WORKDIR/metrics.jsonl (or the
  workdir itself); for a gs:// workdir the segments are read and concatenated."""
  path = os.fspath(path)
  root = storage.parent(path) if storage.basename(path) == workdir_lib.METRICS_JSONL else path
  local = workdir_lib.metrics_jsonl(root)
  if storage.exists(local):
    return [json.loads(line) for line in storage.read_text(local).splitlines() if line.strip()]
  segments = _segments(root)
  if not segments and not storage.exists(root):
    raise FileNotFoundError(f"{local} does not exist")
  return [row for _, p in segments for _, row in _read_segment(p)]


def create_writer(root: str) -> RunWriter:
  is_main = jax.process_index() == 0
  if storage.is_url(root):
    writers = [metric_writers.LoggingWriter()]
    if is_main:
      writers.append(SegmentWriter(root))
  else:
    writers = [metric_writers.create_default_writer(root, just_logging=not is_main,
                                                    asynchronous=False)]
    if is_main:
      writers.append(JsonlWriter(workdir_lib.metrics_jsonl(root)))
  return RunWriter(writers, root, is_main)
