"""Runs a plan: builds the teacher once and holds it across phases, resumes at the first
unfinished phase, applies the transitions between phases (pruning is a pure function of
the previous phase's state), exports each stage and marks it done.

  python -m tinyclip_jax.main --config=… --workdir=…  →  runner.run(config, workdir)
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from tinyclip_jax import checkpoint, metrics as metrics_lib, paths, storage
from tinyclip_jax import workdir as workdir_lib
from tinyclip_jax.models import CLIPConfig, count_params
from tinyclip_jax.train import checks, loop, masking, plan as plan_lib, prepare, preemption
from tinyclip_jax.train import teacher as teacher_lib

DONE = workdir_lib.STAGE_DONE  # a finished stage's summary; the stage is skipped on restart


class _Teachers:
  """Teachers by what names them: each loaded once per run. A teacher that a phase of
  this run trained and exported is taken from memory, not read back."""

  def __init__(self):
    self.named: dict[tuple, Any] = {}
    self.loaded: dict[tuple, Any] = {}
    self.exported: dict[str, tuple[Any, CLIPConfig]] = {}

  def _exported(self, config):
    path = config.teacher.checkpoint.rstrip("/")
    one = not config.teacher.cache and not config.teacher.get("ensemble")
    return self.exported.get(path) if one else None

  def config(self, config) -> CLIPConfig | None:
    """The (primary) teacher's model config, read without touching a device; the
    ensemble's members are read and checked against it here too."""
    if self._exported(config) is not None:
      return self._exported(config)[1]
    key = teacher_lib.key(config)
    if key in self.loaded:
      return self.loaded[key].config if self.loaded[key] else None
    if key not in self.named:
      named = teacher_lib.spec(config)
      self.named[key] = (named, teacher_lib.member_specs(config, named[0]) if named else ())
    named = self.named[key][0]
    return named[0] if named else None

  def get(self, config, mesh):
    key = teacher_lib.key(config)
    if key not in self.loaded:
      if self._exported(config) is not None:
        self.loaded[key] = teacher_lib.from_params(*self._exported(config)[::-1], mesh,
                                                    config.mesh,
                                                    float(config.loss.teacher_scale))
      else:
        self.config(config)
        self.loaded[key] = teacher_lib.load(config, mesh, *self.named.pop(key))
    return self.loaded[key]


def _resume_point(mgr) -> tuple[int | None, dict | None]:
  step = mgr.latest_step()
  return step, (checkpoint.latest_model(mgr) if step is not None else None)


def _stage(phases: list[plan_lib.Phase], teachers: _Teachers, meshes: dict,
           notice) -> dict[str, Any]:
  """The phases of one stage (one workdir), from the first unfinished one."""
  first = phases[0]
  config, workdir = first.config, first.workdir
  mesh_key = json.dumps(config.mesh.to_dict(), sort_keys=True)
  if mesh_key not in meshes:
    meshes[mesh_key] = checks.mesh(config)
  mesh = meshes[mesh_key]
  mgr = checkpoint.manager(workdir, config.keep_checkpoints)
  latest, latest_model = _resume_point(mgr)
  teacher_cfg, named = teachers.config(config), None
  if latest is None:  # a fresh stage: every check before its teacher's weights are made
    named = prepare.student_config(config, teacher_cfg)
    prepare.check(config, teacher_cfg, named[1], first.start)
  teacher = teachers.get(config, mesh)
  out = loop.Outputs(mgr, notice, json.loads(config.to_json_best_effort()),
                     lambda start: _open_writer(config, workdir, start))
  result, carry = None, None
  try:
    for phase in phases:
      if latest is not None and latest >= phase.last_step and not phase.export:
        continue  # finished: the next phase's checkpoints hold what it made
      resuming = latest is not None and latest >= phase.first_step
      if resuming and phase.start == "prune" and latest_model is None:
        raise checks.SetupError(f"the checkpoint of step {latest} in {workdir} has no model "
                                "config, so the pruned student cannot be rebuilt; start a new "
                                "workdir.")
      if phase.start == "prune":
        cfg, host = ((CLIPConfig.from_dict(latest_model), None) if resuming else carry[:2])
      else:  # the stage's first phase
        host, cfg = named or prepare.student_config(config, teacher_cfg)
        if resuming and latest_model is not None and CLIPConfig.from_dict(latest_model) != cfg:
          raise checks.SetupError(
              f"the checkpoint of step {latest} in {workdir} holds another student model than "
              "this config names; resume with the config the run was started with, or give a "
              "new workdir.")
      if phase.start == "prune":  # the replication guard, with the fix that applies here
        masking.check_pruned(config, cfg, mesh)
      setup = prepare.setup(config, mesh, teacher, cfg, masks=phase.masks,
                            guard=phase.start != "prune")
      if resuming:
        step, state, data_state = checkpoint.restore_latest(mgr, setup.abstract_state)
        start = loop.Start(step, state, data_state)
        logging.info("%s: resumed from step %d in %s", phase.name, step, workdir)
      elif phase.start == "prune":
        start = loop.Start(phase.first_step, prepare.init_state(
            config, setup, jax.device_put(host, setup.param_shardings), phase.first_step),
                           carry[2], save=True)
      else:
        start = loop.Start(0, prepare.init_state(
            config, setup, prepare.student_params(config, setup, teacher, host)))
      result = loop.train_phase(phase, setup, start, out)
      latest = None  # later phases of this stage start fresh from what this one made
      if result.preempted:
        return {"params": result.weights, "student_config": cfg, "metrics": result.metrics,
                "evals": result.evals, "step": result.step, "preempted": True}
      if phase.masks:  # the transition to the next phase: prune by the learned masks
        params, pruned, gates = masking.prune_state(result.state.params, cfg,
                                                    result.state.masks, setup.masking)
        masking.write_structure(workdir, result.step, cfg, "pruned", gates,
                                count_params(params))
        carry = (pruned, params, result.data_state)
      else:
        carry = None
  finally:
    mgr.close()
    out.close()
  path = loop.export(workdir, result.weights, cfg)
  logging.info("exported the student to %s", path)
  teachers.exported[path] = (result.weights, cfg)
  return {"params": result.weights, "student_config": cfg, "metrics": result.metrics,
          "evals": result.evals, "step": result.step}


def _open_writer(config, workdir: str, start: int):
  storage.makedirs(workdir)
  if start and jax.process_index() == 0:
    metrics_lib.truncate(workdir, start)  # the restart logs those steps again
  writer = metrics_lib.create_writer(workdir)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  return writer


# Fields that change what a stage trains are its identity; these may change between
# attempts (cadence of logs, evaluations and checkpoints, input threads, the mesh).
_FREE = ("log_every", "eval_every", "eval", "checkpoint_every", "keep_checkpoints", "profile",
         "mesh", "stages", "compile_cache")
_FREE_DATA = ("prefetch", "threads", "num_parallel_calls", "stall_records",
              "min_usable_fraction")


def identity(config: ml_collections.ConfigDict) -> dict:
  """The fields of a stage's config that decide what it trains, as JSON values."""
  c = json.loads(config.to_json_best_effort())
  c = {k: v for k, v in c.items() if k not in _FREE}
  c["data"] = {k: v for k, v in c.get("data", {}).items() if k not in _FREE_DATA}
  if not c.get("masks", {}).get("enabled"):  # unused mask settings decide nothing
    c["masks"] = {"enabled": False}
  if not c.get("teacher", {}).get("ensemble", True):  # one teacher: as recorded before
    del c["teacher"]["ensemble"]                        # ensembles existed
  return c


def _first_difference(a, b, prefix: str = ""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
      if d:
        return d
    return None
  return None if a == b else (prefix.rstrip("."), a, b)


class StageChanged(checks.SetupError):
  """A stage folder started with another value of `field` than this config gives."""

  def __init__(self, stage: str, workdir: str, field: str, was, now, name: str = ""):
    self.stage, self.workdir, self.field, self.was, self.now = stage, workdir, field, was, now
    super().__init__(f"stage {stage} in {workdir} was started with {name or field}={was!r} and "
                     f"this config gives {now!r}; run the config it was started with, or give "
                     "a new workdir.")

  def named(self, name: str) -> "StageChanged":
    """The same refusal naming the field as the user sets it (e.g. demo.teacher_steps)."""
    return StageChanged(self.stage, self.workdir, self.field, self.was, self.now, name)


def _check_stage_config(name: str, workdir: str, config) -> bool:
  """A stage folder holds one config's work: a stage started (or finished) with another
  is refused (StageChanged), naming the first field that differs, never mixed or
  silently skipped. Returns whether the folder records its config already."""
  path = workdir_lib.stage_config(workdir)
  if not storage.exists(path):
    return False
  diff = _first_difference(storage.read_json(path), identity(config))
  if diff:
    raise StageChanged(name, workdir, *diff)
  return True


def check_stages(phases: list[plan_lib.Phase]) -> None:
  """Refuses (StageChanged) a stage folder started with another config: for a caller
  with work of its own to do before run_plan (the cached demo's cache build)."""
  for (name, workdir), group in itertools.groupby(phases, key=lambda p: (p.stage, p.workdir)):
    if name:
      _check_stage_config(name, workdir, list(group)[0].config)


def run_plan(phases: list[plan_lib.Phase]) -> dict[str, Any]:
  """Every phase in order; a stage whose done marker exists is skipped."""
  logging.info("run plan:\n%s", plan_lib.describe(phases))
  for root in dict.fromkeys(p.workdir for p in phases):  # a missing or read-only bucket:
    storage.check_writable(root)                        # found before any work
    checks.workdir(root)
  stages = [(k, list(g)) for k, g in itertools.groupby(phases, key=lambda p: (p.stage, p.workdir))]
  recorded = {workdir: _check_stage_config(name, workdir, group[0].config)  # before any work
              for (name, workdir), group in stages if name}
  teachers, meshes, result = _Teachers(), {}, {"stages": []}
  with preemption.Notice() as notice:
    for (name, workdir), group in stages:
      done = workdir_lib.stage_done(workdir)
      if name and not recorded[workdir] and jax.process_index() == 0:  # the stage starts
        storage.write_json(workdir_lib.stage_config(workdir), identity(group[0].config))
      if name and storage.exists(done):
        logging.info("stage %s is complete in %s; skipping it", name, workdir)
        result["stages"].append(storage.read_json(done))
        continue
      t0 = time.time()
      r = _stage(group, teachers, meshes, notice)
      result.update(r)
      if r.get("preempted"):
        return result
      if name:
        summary = {"name": name.split("_", 1)[1], "workdir": workdir, "step": r["step"],
                   "student_config": r["student_config"].to_dict(),
                   "evals": r["evals"][-1:] if r["evals"] else [],
                   "seconds": round(time.time() - t0, 1)}
        if jax.process_index() == 0:
          storage.write_json(done, summary)  # the stage's commit marker, written last
        result["stages"].append(summary)
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir` (resuming what a previous attempt left): one
  phase, the two phases of automatic inheritance, or every stage in order. Relative
  paths (workdir, checkpoints, caches, shards) are resolved here, once.
  Returns {"params", "student_config", "metrics" (last logged), "evals", "step",
  "stages" (each stage's summary), and "preempted" when a SIGTERM stopped it}."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  return run_plan(plan_lib.plan(config, workdir))
