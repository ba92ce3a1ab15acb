"""A run is a plan of phases, made from the config before anything runs.

A phase trains one student with one optimizer over a step range, in one workdir:

  * a plain run is one phase;
  * automatic inheritance is two: `masked` (steps 0 … masks.prune_step, learning the
    structure masks) and `pruned` (prune_step … total_steps, the pruned student with a
    fresh optimizer); pruning is the transition between them;
  * `config.stages` (progressive distillation) chains stages, each one or two phases in
    WORKDIR/<k>_<name>, each stage starting from an earlier stage's export;
  * the demo is stages too (its teacher, the distilled student, the scratch control).

Each phase says where its student's starting weights come from (`start`):
  scratch          random initialization;
  inherit          cut from the teacher (manual inheritance) or from `inherit_from`;
  checkpoint       a converted/exported model folder (`student.checkpoint`);
  prune            the previous phase's student, pruned by its masks.

The runner (train/runner.py) holds the teacher across phases and resumes at the first
unfinished phase; train/loop.py trains exactly one phase.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from tinyclip_jax.train import checks, prepare

STAGE_KEYS = ("name", "from_stage", "teacher_from_stage")


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str          # unique in the plan: "train", "masked", "0_auto75/pruned", ...
  stage: str         # the stage's folder name ("" for a run without stages)
  workdir: str       # the stage's folder: checkpoints, metrics, evals, final/
  config: ml_collections.ConfigDict  # the stage's config (paths resolved, overrides merged)
  start: str         # scratch | inherit | checkpoint | prune (see the module doc)
  masks: bool        # learns structure masks (the first phase of automatic inheritance)
  first_step: int    # trains steps first_step+1 … last_step
  last_step: int
  export: bool       # the stage's last phase: writes final/ and the stage's done marker


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


def stage_phases(config: ml_collections.ConfigDict, workdir: str,
                 stage: str = "") -> list[Phase]:
  """The phases of one run config in one workdir (one stage)."""
  prepare.validate(config)
  prefix = f"{stage}/" if stage else ""
  start = config.student.init
  if not config.masks.enabled:
    return [Phase(f"{prefix}train", stage, workdir, config, start, False, 0,
                  config.total_steps, True)]
  p = config.masks.prune_step
  return [Phase(f"{prefix}masked", stage, workdir, config, start, True, 0, p, False),
          Phase(f"{prefix}pruned", stage, workdir, config, "prune", False, p,
                config.total_steps, True)]


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, Any, str]]:
  """(name, config, workdir) of every stage, checked before anything runs. Stage k runs
  in WORKDIR/<k>_<name>; it starts from stage `from_stage`'s export (by default the one
  before; -1: as the base config says) — as is, or cut smaller when the stage sets
  student.init='inherit'; `teacher_from_stage` makes an earlier stage's export the
  teacher (the demo distils from the teacher it trained)."""
  base = copy.deepcopy(config)
  base.stages = ()
  out, names = [], []
  for k, stage in enumerate(config.stages):
    if not isinstance(stage, (dict, ml_collections.ConfigDict)):
      raise prepare.SetupError(f"stages[{k}] is {stage!r}; each stage is a ConfigDict of "
                               "fields to override.")
    stage = dict(stage)
    name = str(stage.get("name") or f"stage{k}")
    c = copy.deepcopy(base)
    _merge(c, {key: v for key, v in stage.items() if key not in STAGE_KEYS}, f"stages[{k}]")
    sub = f"{workdir.rstrip('/')}/{k}_{name}"
    source = int(stage.get("from_stage", k - 1))
    teacher = int(stage.get("teacher_from_stage", -1))
    for what, value in (("starts from", source), ("takes its teacher from", teacher)):
      if not -1 <= value < k:
        choice = (f"one of -1 … {k - 1} (-1: as the base config says)" if k else
                  "-1 (the first stage starts as the base config says)")
        raise prepare.SetupError(
            f"stages[{k}] ({name}) {what} stage {value}, which does not come before it; set "
            f"from_stage / teacher_from_stage to {choice}.")
    if source >= 0:
      previous = f"{out[source][2]}/final"
      student = dict(stage.get("student", {}))
      if c.student.init == "inherit" and "init" in student:
        c.student.inherit_from = previous  # manual: cut a smaller model from it
      else:
        if {"custom", "model"} & set(student):
          raise prepare.SetupError(
              f"stages[{k}] ({name}) sets student.{sorted({'custom', 'model'} & set(student))[0]}"
              f" but continues stage {source}'s student as it is; add student.init='inherit' "
              "to cut that model from it, or drop the field.")
        c.student.init, c.student.checkpoint = "checkpoint", previous
    if teacher >= 0 and c.teacher.get("ensemble"):
      raise prepare.SetupError(
          f"stages[{k}] ({name}) takes its teacher from stage {teacher} but teacher.ensemble "
          f"names {sorted(c.teacher.ensemble)}; an earlier stage's export is one teacher, so "
          "drop teacher.ensemble or teacher_from_stage.")
    if teacher >= 0:
      c.teacher.checkpoint = f"{out[teacher][2]}/final"
      c.teacher.model = ""
    prepare.validate(c)
    out.append((name, c, sub))
    names.append(name)
  if len(set(names)) != len(names):
    raise prepare.SetupError(f"stage names {names} repeat; give each stage its own name.")
  return out


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[Phase]:
  """Every phase of the run, in order (paths must already be resolved)."""
  checks.workdir(workdir)
  if not config.stages:
    return stage_phases(config, workdir)
  phases = []
  for k, (name, c, sub) in enumerate(stages(config, workdir)):
    phases += stage_phases(c, sub, f"{k}_{name}")
  return phases


def describe(phases: list[Phase]) -> str:
  """One line per phase, logged before the run starts."""
  return "\n".join(f"  {p.name}: steps {p.first_step}…{p.last_step}, student {p.start}"
                   f"{' + masks' if p.masks else ''} in {p.workdir}" for p in phases)
