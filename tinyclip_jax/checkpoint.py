"""Orbax checkpoints of a run: train state (student params, optimizer state, mask
state, step), input position, the run config and the student's model config (which
changes at the prune step of automatic inheritance). The teacher is frozen data
and is never saved."""
from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from tinyclip_jax import workdir as workdir_lib


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  path = workdir_lib.checkpoints(workdir)
  # create=False: the folder appears with the first save, so a run that fails its
  # setup (bad mesh, missing teacher, ...) leaves nothing behind.
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                                 enable_async_checkpointing=True))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: dict, model: dict | None = None) -> bool:
  items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
               config=ocp.args.JsonSave(config))
  if model is not None:
    items["model"] = ocp.args.JsonSave(model)
  return mgr.save(step, args=ocp.args.Composite(**items), force=True)


def latest_model(mgr: ocp.CheckpointManager) -> dict | None:
  """The student model config saved with the newest checkpoint (None if absent)."""
  step = mgr.latest_step()
  if step is None or not (mgr.directory / str(step) / "model").exists():
    return None
  return mgr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any):
  """(step, state, data_state) of the newest complete checkpoint, or None."""
  step = mgr.latest_step()
  if step is None:
    return None
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return step, restored["state"], restored["data"]
