"""Preemption: a SIGTERM (what TPU VMs and most schedulers send before taking a machine
away) makes the run save a checkpoint at an agreed step and exit 0.

Several processes: jax's preemption service (started by jax.distributed.initialize)
catches the signal and agrees on the step at which every process saves
(`reached_preemption_sync_point`). One process: jax has no such service,
so a Python handler records the notice and the next step saves.
"""
from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Notice:
  """`reached(step)` on every step, on every process; a context manager."""

  def __init__(self):
    self.received = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")
    self.received = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False
    return self.received

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
