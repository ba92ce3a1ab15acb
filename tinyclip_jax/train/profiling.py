"""A `jax.profiler` trace of a window of train steps (config.profile), written to
WORKDIR/profile for TensorBoard's profile plugin or Perfetto.

Steps profile.start_step … start_step + num_steps − 1 are traced, on process 0 only
(one trace per run is enough to read, and every host writing into one folder would
interleave files). The trace stops only after the window's last step has finished on
the device: steps are dispatched asynchronously, so stopping right after dispatch
would cut the window short.
"""
from __future__ import annotations

import tempfile

import jax
import ml_collections
from absl import logging

from tinyclip_jax import storage, workdir as workdir_lib


def check(config: ml_collections.ConfigDict, error) -> None:
  """Field checks of config.profile; `error` is the exception class to raise."""
  p = config.profile
  if p.start_step < 0 or p.num_steps < 0:
    raise error(f"profile.start_step {p.start_step} and profile.num_steps {p.num_steps} must be "
                ">= 0 (0 turns profiling off).")
  if p.num_steps and not p.start_step:
    raise error(f"profile.num_steps is {p.num_steps} but profile.start_step is 0 (off); set "
                "profile.start_step to the first step to trace, e.g. 10 (after warm-up).")


def trace_dir(workdir: str) -> str:
  return workdir_lib.profile(workdir)


class StepWindow:
  """Call `before(step)` before dispatching a step and `after(step, outputs)` after;
  `close()` stops a trace a phase ended inside of (preemption, the prune step)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    p = config.profile
    enabled = p.start_step > 0 and p.num_steps > 0 and jax.process_index() == 0
    self.first = p.start_step if enabled else None
    self.last = p.start_step + p.num_steps - 1 if enabled else None
    self.workdir = workdir
    self.active = False
    self._local = None  # gs://: traced into a local folder, copied at close

  def before(self, step: int) -> None:
    if self.first is not None and self.first <= step <= self.last and not self.active:
      out = trace_dir(self.workdir)
      if storage.is_url(out):  # the profiler writes through TF's file system, not ours
        self._local = tempfile.mkdtemp(prefix="tinyclip_profile_")
      jax.profiler.start_trace(self._local or out)
      self.active = True
      logging.info("profiling steps %d-%d into %s", step, self.last, trace_dir(self.workdir))

  def after(self, step: int, outputs) -> None:
    if self.active and step >= self.last:
      self.close(outputs)

  def close(self, outputs=None) -> None:
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      if self._local is not None:
        storage.copy_local(self._local, trace_dir(self.workdir))
        storage.remove(self._local)
        self._local = None
      logging.info("wrote the profile to %s", trace_dir(self.workdir))
