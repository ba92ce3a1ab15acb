"""Progressive multi-stage distillation: a run of runs.

`config.stages` is a tuple of ConfigDicts, each overriding fields of the run config
(plus `name`, and `from_stage`: the stage whose final student this one starts from,
by default the one before). Stage k runs in WORKDIR/<k>_<name> with the same
teacher; it starts from stage from_stage's exported student — as is
(student.init='checkpoint', e.g. masking it again for automatic inheritance), or cut
down to a smaller model when the stage sets student.init='inherit' (manual
inheritance). A stage whose export is complete is skipped on restart, and the
stage in progress resumes from its own checkpoints.
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections
from absl import logging
from tinyclip_jax import paths, storage, workdir as workdir_lib
from tinyclip_jax.train import loop, prepare

STAGE_KEYS = ("name", "from_stage")
DONE = workdir_lib.STAGE_DONE


def _merge(base: ml_collections.ConfigDict, override, where: str) -> None:
  """Recursive update that refuses fields the base config does not have."""
  for key, value in override.items():
    if key not in base:
      raise prepare.SetupError(f"{where}.{key} names no field of the config; every field and "
                               "its default is in tinyclip_jax/train/defaults.py.")
    if isinstance(base[key], ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise prepare.SetupError(f"{where}.{key} must be a group of fields, not {value!r}.")
      _merge(base[key], value, f"{where}.{key}")
    else:
      base[key] = value


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, Any, str]]:
  """(name, config, workdir) of every stage, checked before anything runs."""
  stages = list(config.stages)
  base = copy.deepcopy(config)
  base.stages = ()
  out, names = [], []
  for k, stage in enumerate(stages):
    if not isinstance(stage, (dict, ml_collections.ConfigDict)):
      raise prepare.SetupError(f"stages[{k}] is {stage!r}; each stage is a ConfigDict of "
                               "fields to override.")
    stage = dict(stage)
    name = str(stage.get("name") or f"stage{k}")
    source = int(stage.get("from_stage", k - 1))
    if not -1 <= source < k:
      raise prepare.SetupError(
          f"stages[{k}] ({name}) starts from stage {source}, which does not come before it; "
          f"set from_stage to one of -1 … {k - 1} (-1: start as the base config says).")
    c = copy.deepcopy(base)
    _merge(c, {key: v for key, v in stage.items() if key not in STAGE_KEYS}, f"stages[{k}]")
    sub = workdir_lib.stage(workdir, k, name)
    if source >= 0:
      previous = workdir_lib.final(out[source][2])
      if c.student.init == "inherit" and "student" in stage and "init" in stage["student"]:
        c.student.inherit_from = previous  # manual: cut a smaller model from it
      else:
        c.student.init, c.student.checkpoint = "checkpoint", previous
    prepare.validate(c)
    out.append((name, c, sub))
    names.append(name)
  if len(set(names)) != len(names):
    raise prepare.SetupError(f"stage names {names} repeat; give each stage its own name.")
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One run, or every stage in order (resuming where a previous attempt stopped).
  Relative paths (workdir, checkpoints, caches, shards) are resolved here, once."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  if not config.stages:
    return loop.run(config, workdir)
  result: dict[str, Any] = {"stages": []}
  for name, c, sub in plan(config, workdir):
    done = workdir_lib.stage_done(sub)
    if storage.exists(done):
      logging.info("stage %s is complete in %s; skipping it", name, sub)
      result["stages"].append(storage.read_json(done))
      continue
    logging.info("stage %s: %s", name, sub)
    r = loop.run(c, sub)
    if r.get("preempted"):
      return r
    summary = {
        "name": name,
        "workdir": sub,
        "step": r["step"],
        "student_config": r["student_config"].to_dict(),
        "evals": r["evals"][-1:] if r["evals"] else []
    }
    if jax.process_index() == 0:
      storage.write_json(done, summary)  # the stage's commit marker, written last
    result["stages"].append(summary)
    result.update(r)
  return result
