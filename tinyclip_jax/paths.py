"""Paths a user gives, made absolute once where they enter the package.

A relative path means "relative to where I ran the command"; orbax (and tensorstore
under it) refuses relative paths, and a path stored in a checkpoint or a stage plan
must mean the same thing after a restart from another folder. So every entry point
(the CLIs, `train.runner.run`, `demo.run`) resolves the paths it is given here, and
nothing further in reads a relative path. URLs (`gs://…`, any `scheme://`) pass
through unchanged.
"""
from __future__ import annotations

import copy
import os

import ml_collections

# Config fields that name files or folders (the "name:PATH" task forms of
# eval.tasks are handled by `resolve_tasks`).
CONFIG_PATHS = ("teacher.checkpoint", "teacher.cache", "student.checkpoint",
                "student.inherit_from", "data.train", "data.data_dir", "eval.data_dir")
PATTERN_SEP = "::"  # several shard patterns in one data.train string


def is_url(path: str) -> bool:
  return "://" in path


def resolve(path: str) -> str:
  """`path` made absolute against the current folder (`~` expanded); URLs and ""
  unchanged."""
  path = os.fspath(path)
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_patterns(patterns: str) -> str:
  """Each '::'-joined shard pattern resolved (globs and braces are kept as text)."""
  return PATTERN_SEP.join(resolve(p) if p else p for p in patterns.split(PATTERN_SEP))


def resolve_tasks(tasks: str) -> str:
  """eval.tasks with the paths of its `folder:PATH` and `wds:PATTERN` entries resolved."""
  out = []
  for task in tasks.split(","):
    kind, sep, rest = task.strip().partition(":")
    if sep and kind in ("folder", "wds") and rest:
      task = f"{kind}:{resolve_patterns(rest) if kind == 'wds' else resolve(rest)}"
    out.append(task)
  return ",".join(out)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a run config with every path field (and those of its stage overrides)
  resolved."""
  config = copy.deepcopy(config)
  for field in CONFIG_PATHS:
    section, name = field.split(".")
    group = config.get(section)
    if group is None or name not in group or not isinstance(group[name], str):
      continue
    group[name] = (resolve_patterns if field == "data.train" else resolve)(group[name])
  ensemble = config.teacher.get("ensemble") if "teacher" in config else None
  for name in (ensemble or {}):  # the ensemble's members' checkpoints
    member = ensemble[name]
    if isinstance(member, ml_collections.ConfigDict) and isinstance(
        member.get("checkpoint"), str):
      member.checkpoint = resolve(member.checkpoint)
  if "eval" in config and isinstance(config.eval.get("tasks"), str):
    config.eval.tasks = resolve_tasks(config.eval.tasks)
  stages = config.get("stages") or ()
  if stages:
    config.stages = tuple(_resolve_override(dict(s)) if isinstance(
        s, (dict, ml_collections.ConfigDict)) else s for s in stages)
  return config


def _resolve_override(stage: dict) -> dict:
  """A stage's override dict with its path fields resolved (others untouched)."""
  for field in CONFIG_PATHS:
    section, name = field.split(".")
    group = stage.get(section)
    if isinstance(group, (dict, ml_collections.ConfigDict)) and isinstance(group.get(name), str):
      group = dict(group)
      group[name] = (resolve_patterns if field == "data.train" else resolve)(group[name])
      stage[section] = group
  return stage
