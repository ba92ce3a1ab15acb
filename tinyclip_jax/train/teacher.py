"""The teacher: built once per run and held across its phases (and stages).

Its weights come from a converted checkpoint (`teacher.checkpoint`), or are random
for a zoo/custom architecture (smoke runs, benchmarks), or are handed over by an
earlier phase that trained it (the demo). With `teacher.cache` the step reads the
teacher's embeddings from disk instead; the weights are still needed to check that
the cache was made by this teacher and for weight inheritance.

An ensemble (config.teacher.ensemble) adds named members beside this primary teacher,
each with its own weights and logit scale. The primary alone is what the student
inherits from (manually, or the structure automatic inheritance measures sparsity
against); every member must read the primary's images and tokens.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
from absl import logging

from tinyclip_jax import parallel
from tinyclip_jax.models import CLIPConfig, init_params
from tinyclip_jax.train import checks, defaults


PRIMARY = "teacher"  # the primary teacher's name among an ensemble's members


@dataclasses.dataclass
class Member:
  """A teacher of an ensemble beside the primary one (config.teacher.ensemble.NAME)."""
  name: str
  config: CLIPConfig
  params: Any                     # on device, sharded
  shardings: Any
  host: Any = None                # the loaded weights; None for random ones
  scale: float = 50.0             # its logit scale τ


@dataclasses.dataclass
class Teacher:
  """The primary teacher (config.teacher) and, for an ensemble, its other members."""
  config: CLIPConfig
  params: Any                     # on device, sharded
  shardings: Any
  host: Any = None                # the loaded weights (digest of the cache check)
  cache: tuple[str, dict] | None = None  # (path, manifest) with teacher.cache
  members: tuple[Member, ...] = ()  # the ensemble's other teachers, by name
  scale: float = 50.0             # the primary's τ (loss.teacher_scale)

  @property
  def configs(self) -> tuple[CLIPConfig, ...]:
    """Every teacher's model config in member order (the primary first)."""
    return (self.config, *(m.config for m in self.members))

  @property
  def step_params(self):
    """The params the train step takes: the primary's, or for an ensemble the tuple
    of every teacher's (member order)."""
    return (self.params, *(m.params for m in self.members)) if self.members else self.params

  @property
  def step_shardings(self):
    return ((self.shardings, *(m.shardings for m in self.members)) if self.members
            else self.shardings)


def all_members(t: Teacher) -> list[tuple[str, CLIPConfig, Any, Any, float]]:
  """(name, model config, params on device, host weights or None, τ) of every teacher
  of `t`: the primary first under the name "teacher", then the members by name."""
  return [(PRIMARY, t.config, t.params, t.host, t.scale)] + [
      (m.name, m.config, m.params, m.host, m.scale) for m in t.members]


def key(config) -> tuple:
  """What identifies a teacher section: equal keys share one loaded teacher (the whole
  ensemble and every τ must be equal)."""
  t = config.teacher
  ensemble = t.get("ensemble") or {}
  members = tuple((n, ensemble[n].to_json_best_effort(sort_keys=True))
                  for n in sorted(ensemble))
  return (t.checkpoint, t.model, str(t.custom.to_dict()) if "custom" in t else "", t.cache,
          config.seed, config.precision, str(config.mesh.to_dict()), members,
          float(config.loss.teacher_scale))


def spec(config) -> tuple[CLIPConfig, Any] | None:
  """(model config, host weights or None for random ones) of the teacher `config.teacher`
  names, read without touching a device (so every check runs before any compile);
  None when there is no teacher."""
  if config.teacher.checkpoint:
    host, cfg = checks.load_checkpoint(config.teacher.checkpoint, "teacher.checkpoint")
    return cfg, host
  if defaults.has_model(config.teacher):
    return checks.model_config(config.teacher, "teacher"), None
  return None


def member_specs(config, primary: CLIPConfig
                 ) -> tuple[tuple[str, CLIPConfig, Any, float], ...]:
  """(name, model config, host weights or None, τ) of every ensemble member, checked
  against the primary teacher's model `primary` without touching a device: each must
  name a model, have a positive scale and read the primary's images and tokens."""
  out = []
  for name in defaults.ensemble_names(config):
    m, what = config.teacher.ensemble[name], f"teacher.ensemble.{name}"
    checks.ensemble_member(m, what)
    if m.checkpoint:
      host, cfg = checks.load_checkpoint(m.checkpoint, f"{what}.checkpoint")
    else:
      host, cfg = None, checks.model_config(m, what)
    checks.same_input(primary, cfg, what)
    out.append((name, cfg, host, float(m.scale)))
  return tuple(out)


def _random(cfg: CLIPConfig, shardings, rng):
  return jax.jit(lambda r: init_params(cfg, r), out_shardings=shardings)(rng)


def _member_rng(seed: int, name: str):
  """A random member's init key: from the run's seed and its name (so adding a member
  does not change another's weights), apart from the primary's and the student's."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def load(config, mesh, named: tuple[CLIPConfig, Any] | None = None,
         members: tuple | None = None) -> Teacher | None:
  """The teacher `config.teacher` names (or `named`, its spec) on `mesh`, with its
  ensemble members (`members`: their member_specs, read here when None); None when
  there is none."""
  named = spec(config) if named is None else named
  if named is None:
    return None
  cfg, host = named
  members = member_specs(config, cfg) if members is None else members
  shardings = checks.shardings(cfg, mesh, config.mesh, "teacher")
  if host is None:
    logging.warning("the teacher has random weights (teacher.checkpoint is empty); for a "
                    "real distillation convert one and pass --config.teacher.checkpoint=DIR")
    params = _random(cfg, shardings,
                     jax.random.split(jax.random.key(config.seed))[0])  # [1]: the student's
  else:
    params = jax.device_put(host, shardings)
  loaded = []
  for name, m_cfg, m_host, scale in members:
    m_shard = checks.shardings(m_cfg, mesh, config.mesh, f"teacher.ensemble.{name}")
    if m_host is None:
      logging.warning("ensemble member %s has random weights (its checkpoint is empty)", name)
      m_params = _random(m_cfg, m_shard, _member_rng(config.seed, name))
    else:
      m_params = jax.device_put(m_host, m_shard)
    loaded.append(Member(name, m_cfg, m_params, m_shard, m_host, scale))
  teacher = Teacher(cfg, params, shardings, host, members=tuple(loaded),
                    scale=float(config.loss.teacher_scale))
  if config.teacher.cache:
    teacher.cache = check_cache(config, teacher)
  return teacher


def from_params(cfg: CLIPConfig, params, mesh, mesh_config=None, scale: float = 50.0) -> Teacher:
  """A teacher an earlier phase trained (its export is on disk too); one teacher (the
  plan refuses teacher_from_stage with an ensemble)."""
  shardings = checks.shardings(cfg, mesh, mesh_config, "teacher")
  return Teacher(cfg, jax.device_put(params, shardings), shardings, scale=scale)


def check_cache(config, teacher: Teacher) -> tuple[str, dict]:
  """(path, manifest) of a teacher cache built for exactly this teacher and input."""
  from tinyclip_jax.data import sample_cache, teacher_cache  # pylint: disable=import-outside-toplevel
  path = config.teacher.cache
  try:
    manifest = teacher_cache.load_manifest(path)
    weights = teacher.host if teacher.host is not None else parallel.host_gather(teacher.params)
    if sample_cache.is_sample_cache(manifest):
      members = [(name, cfg, host if host is not None else parallel.host_gather(params), scale)
                 for name, cfg, params, host, scale in all_members(teacher)]
      return path, check_sample_cache(config, manifest, members)
    if teacher.members:
      raise teacher_cache.CacheError(
          f"teacher.cache {path} is a per-step cache, which holds one teacher's embeddings; "
          "an ensemble reads a per-sample cache of all its teachers (python -m "
          "tinyclip_jax.cache_teacher --augmentations=K with this config).")
    expected = teacher_cache.describe(config, teacher.config,
                                      teacher_cache.teacher_digest(weights))
    teacher_cache.check(manifest, expected, config.total_steps, path)
  except teacher_cache.CacheError as e:
    raise checks.SetupError(str(e)) from e
  logging.info("reading the teacher's embeddings from %s (%d steps cached)", path,
               manifest["steps"])
  return path, manifest


def check_sample_cache(config, manifest: dict, members: list) -> dict:
  """A per-sample cache (data/sample_cache.py) of exactly these teachers [(name, model
  config, host weights, τ)] and this run's crops; returns the manifest."""
  from tinyclip_jax.data import sample_cache  # pylint: disable=import-outside-toplevel
  path = config.teacher.cache
  if config.data.kind not in sample_cache.KINDS:
    raise sample_cache.CacheError(
        f"teacher.cache {path} stores embeddings per sample of webdataset/tfrecord shards, "
        f"but data.kind is {config.data.kind!r}; point data.train at the shards it was built "
        "from.")
  k = int(config.data.augmentations) or int(manifest["augment"]["augmentations"])
  augment = sample_cache.augmentation(config.data, manifest["augment"]["image_size"], k)
  sample_cache.check(manifest, augment, sample_cache.teachers_entry(members), path)
  logging.info("reading the teacher's embeddings per sample from %s (K=%d, %d shards)", path,
               k, len(manifest.get("shards", {})))
  return manifest
