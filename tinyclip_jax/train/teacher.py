"""The teacher: built once per run and held across its phases (and stages).

Its weights come from a converted checkpoint (`teacher.checkpoint`), or are random
for a zoo/custom architecture (smoke runs, benchmarks), or are handed over by an
earlier phase that trained it (the demo). With `teacher.cache` the step reads the
teacher's embeddings from disk instead; the weights are still needed to check that
the cache was made by this teacher and for weight inheritance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from absl import logging

from tinyclip_jax import parallel
from tinyclip_jax.models import CLIPConfig, init_params
from tinyclip_jax.train import checks, defaults


@dataclasses.dataclass
class Teacher:
  config: CLIPConfig
  params: Any                     # on device, sharded
  shardings: Any
  host: Any = None                # the loaded weights (digest of the cache check)
  cache: tuple[str, dict] | None = None  # (path, manifest) with teacher.cache


def key(config) -> tuple:
  """What identifies a teacher section: equal keys share one loaded teacher."""
  t = config.teacher
  return (t.checkpoint, t.model, str(t.custom.to_dict()) if "custom" in t else "", t.cache,
          config.seed, config.precision, str(config.mesh.to_dict()))


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


def load(config, mesh, named: tuple[CLIPConfig, Any] | None = None) -> Teacher | None:
  """The teacher `config.teacher` names (or `named`, its spec) on `mesh`; None when
  there is none."""
  named = spec(config) if named is None else named
  if named is None:
    return None
  cfg, host = named
  shardings = checks.shardings(cfg, mesh, config.mesh, "teacher")
  if host is None:
    logging.warning("the teacher has random weights (teacher.checkpoint is empty); for a "
                    "real distillation convert one and pass --config.teacher.checkpoint=DIR")
    params = jax.jit(lambda r: init_params(cfg, r), out_shardings=shardings)(
        jax.random.split(jax.random.key(config.seed))[0])  # [1]: the student's
  else:
    params = jax.device_put(host, shardings)
  teacher = Teacher(cfg, params, shardings, host)
  if config.teacher.cache:
    teacher.cache = check_cache(config, teacher)
  return teacher


def from_params(cfg: CLIPConfig, params, mesh, mesh_config=None) -> Teacher:
  """A teacher an earlier phase trained (its export is on disk too)."""
  shardings = checks.shardings(cfg, mesh, mesh_config, "teacher")
  return Teacher(cfg, jax.device_put(params, shardings), shardings)


def check_cache(config, teacher: Teacher) -> tuple[str, dict]:
  """(path, manifest) of a teacher cache built for exactly this teacher and input."""
  from tinyclip_jax.data import sample_cache, teacher_cache  # pylint: disable=import-outside-toplevel
  path = config.teacher.cache
  try:
    manifest = teacher_cache.load_manifest(path)
    weights = teacher.host if teacher.host is not None else parallel.host_gather(teacher.params)
    if sample_cache.is_sample_cache(manifest):
      return path, check_sample_cache(config, manifest, [
          ("teacher", teacher.config, weights, float(config.loss.teacher_scale))])
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
