"""Deterministic fault injection, for the tests of preemption and half-finished writes.

TINYCLIP_FAULT holds comma-separated faults; a process given one acts it out exactly
where the code calls the hook, so a test kills a run at a known point instead of
racing a timer:

  kill_at_step:N      SIGKILL after step N (and its checkpoint, if it saves one; the loop
                      lets started async saves finish first, so a restart knows its step)
  term_at_step:N      SIGTERM at step N (a preemption notice) — the handler saves
  kill_in_write:NAME  SIGKILL in the middle of the write named NAME (the part written
                      so far stays behind, as after a real crash)

TINYCLIP_FAULT_PROCESS=K limits the faults to process K of a multi-process run.
Unset (the normal case) every hook is a dictionary lookup and nothing else.
"""
from __future__ import annotations

import os
import signal

ENV = "TINYCLIP_FAULT"


def _faults() -> list[tuple[str, str]]:
  spec = os.environ.get(ENV, "")
  if not spec:
    return []
  only = os.environ.get("TINYCLIP_FAULT_PROCESS")
  if only is not None:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != int(only):
      return []
  out = []
  for item in spec.split(","):
    kind, _, arg = item.strip().partition(":")
    out.append((kind, arg))
  return out


def at_step(step: int, settle=None) -> None:
  """Called by the train loop after each step. `settle` (e.g. the checkpoint manager's
  wait_until_finished) runs before a kill, so the checkpoints started before step N
  are complete and the test knows exactly which one a restart must resume from."""
  for kind, arg in _faults():
    if kind == "kill_at_step" and int(arg) == step:
      if settle is not None:
        settle()
      os.kill(os.getpid(), signal.SIGKILL)
    if kind == "term_at_step" and int(arg) == step:
      os.kill(os.getpid(), signal.SIGTERM)


def in_write(name: str) -> None:
  """Called by a multi-part write after its first part (e.g. between a checkpoint's
  data and its commit marker)."""
  for kind, arg in _faults():
    if kind == "kill_in_write" and arg == name:
      os.kill(os.getpid(), signal.SIGKILL)
