"""The layout of a run's workdir: every artefact's path, as a function of the root.

  checkpoints/<step>/            orbax checkpoints (tinyclip_jax.checkpoint)
  metrics.jsonl                  local workdirs: one JSON line per logged step
  metrics/<step>.jsonl           gs:// workdirs: the same lines in segments, one per
                                 checkpoint interval (objects cannot be appended to)
  events.out.tfevents.*          TensorBoard scalars
  evals/step_<step>.json         eval results of one step
  structure/<tag>_<step>.{json,png}  automatic inheritance: the learned structure
  profile/                       a jax.profiler trace (config.profile)
  <k>_<name>/                    stage k of a multi-stage run (a workdir itself),
  <k>_<name>/stage_done.json     … complete when this marker exists
  final/                         the exported student (trusted once published)
  summary.json, *.png            the demo's summary and plots

Every module asks here for paths and writes through tinyclip_jax.storage, so a
workdir may be local or gs://.
"""
from __future__ import annotations

from tinyclip_jax import storage

CHECKPOINTS = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
METRICS_SEGMENTS = "metrics"
EVALS = "evals"
STRUCTURE = "structure"
PROFILE = "profile"
FINAL = "final"
STAGE_DONE = "stage_done.json"
STAGE_CONFIG = "stage_config.json"
SUMMARY = "summary.json"


def checkpoints(root: str) -> str:
  return storage.join(root, CHECKPOINTS)


def metrics_jsonl(root: str) -> str:
  return storage.join(root, METRICS_JSONL)


def metrics_segments(root: str) -> str:
  return storage.join(root, METRICS_SEGMENTS)


def metrics_segment(root: str, step: int) -> str:
  return storage.join(root, METRICS_SEGMENTS, f"{step:08d}.jsonl")


def events_segment(root: str, step: int) -> str:
  """A TensorBoard event file holding the scalars of one metrics segment (the name
  must contain "tfevents"; TensorBoard reads every such file of the folder)."""
  return storage.join(root, f"events.out.tfevents.{step:010d}.tinyclip")


def eval_result(root: str, step: int) -> str:
  return storage.join(root, EVALS, f"step_{step:08d}.json")


def eval_results(root: str) -> str:
  """The glob pattern of every eval_result of a run."""
  return storage.join(root, EVALS, "step_*.json")


def structure(root: str, tag: str, step: int) -> str:
  """Base path (no extension) of the structure files of `tag` at `step`."""
  return storage.join(root, STRUCTURE, f"{tag}_{step:08d}")


def profile(root: str) -> str:
  return storage.join(root, PROFILE)


def stage(root: str, k: int, name: str) -> str:
  return storage.join(root, f"{k}_{name}")


def stage_done(stage_root: str) -> str:
  return storage.join(stage_root, STAGE_DONE)


def stage_config(stage_root: str) -> str:
  """What a stage was started with (train/runner.py: a resume with another is refused)."""
  return storage.join(stage_root, STAGE_CONFIG)


def final(root: str) -> str:
  return storage.join(root, FINAL)


def summary(root: str) -> str:
  return storage.join(root, SUMMARY)


def plot(root: str, name: str) -> str:
  return storage.join(root, name)


def demo_run(root: str, name: str) -> str:
  return storage.join(root, "runs", name)
