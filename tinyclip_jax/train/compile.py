"""The one way to compile the train step and to build its global batches.

The train loop, the teacher cache builder and the step benchmarks all call these, so
what a benchmark measures is the step training runs: same shardings, donation and
per-text-bucket executables.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tinyclip_jax import parallel
from tinyclip_jax.models import CLIP, CLIPConfig
from tinyclip_jax.train import preflight
from tinyclip_jax.train.step import make_train_step


def batch_abstract(config, student_cfg: CLIPConfig, mesh, teacher_embed_dim=0,
                   text_length: int = 0) -> dict:
  """The global batch of `config.batch_size` pairs; with teacher_embed_dim, also the
  cached teacher embeddings (a tuple of widths: an ensemble's, one (B, width) array per
  teacher in member order); text_length: the tokens' bucket (0 = the context length)."""
  b, s = config.batch_size, student_cfg.vision.image_size
  n = text_length or student_cfg.text.context_length
  out = {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32,
                                        sharding=parallel.batch_sharding(mesh, 4)),
         "tokens": jax.ShapeDtypeStruct((b, n), jnp.int32,
                                        sharding=parallel.batch_sharding(mesh, 2))}
  if teacher_embed_dim:
    rows = lambda d: jax.ShapeDtypeStruct((b, d), jnp.float32,  # noqa: E731
                                          sharding=parallel.batch_sharding(mesh, 2))
    for k in ("teacher_image", "teacher_text"):
      out[k] = (tuple(rows(d) for d in teacher_embed_dim)
                if isinstance(teacher_embed_dim, tuple) else rows(teacher_embed_dim))
  return out


def teacher_embed_dims(setup):
  """The widths of the cached teacher embeddings a batch holds: 0 without a cache, the
  teacher's width, or a tuple of them for an ensemble."""
  if not setup.teacher_cache:
    return 0
  if setup.member_configs:
    return tuple(c.embed_dim for c in setup.teacher_configs)
  return setup.teacher_config.embed_dim


def batch_abstracts(config, setup) -> dict[int, dict]:
  """The global batch of each text bucket, by its token length."""
  dim = teacher_embed_dims(setup)
  return {n: batch_abstract(config, setup.student_config, setup.mesh, dim, n)
          for n in setup.text_lengths}


def global_batch(local: dict[str, np.ndarray], abstract: dict) -> dict[str, jax.Array]:
  """This process's rows of the batch → global device arrays with the step's shardings
  (an ensemble's cached embeddings: tuples of arrays)."""
  def put(a, x):
    if isinstance(a, tuple):
      return tuple(put(b, y) for b, y in zip(a, x, strict=True))
    return jax.make_array_from_process_local_data(a.sharding, x)
  return {k: put(abstract[k], v) for k, v in local.items()}


def memory_mb(compiled) -> float | None:
  """The executable's own account (arguments + outputs + temporaries − aliased), None
  where the backend gives none."""
  try:
    mem = compiled.memory_analysis()
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
            mem.alias_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001 - not every backend reports memory
    return None


def log_compiled(compiled, what: str) -> None:
  mb = memory_mb(compiled)
  if mb is None:
    logging.info("%s: memory analysis unavailable on this backend", what)
  else:
    logging.info("%s: %.1f MiB of device memory", what, mb)


def step_models(config, setup, remat: bool | None = None):
  """(student, teacher) as the train step runs them: dtypes and attention from the
  precision policy, remat for the student, scan_layers for all. The teacher is None, a
  CLIP, or for an ensemble a tuple of CLIPs (member order, the primary first)."""
  student = CLIP(setup.student_config, remat=config.remat if remat is None else remat,
                 scan_layers=config.scan_layers, **setup.policy.student_kw)
  teachers = tuple(CLIP(c, scan_layers=config.scan_layers, **setup.policy.teacher_kw)
                   for c in setup.teacher_configs)
  teacher = teachers if len(teachers) > 1 else teachers[0] if teachers else None
  return student, teacher


def train_step(config, setup, *, remat: bool | None = None, cached: bool | None = None,
               batch_size: int | None = None):
  """The jitted (not yet compiled) step: (state, teacher params, batch) → (state, metrics),
  the state donated. `cached`: the teacher's embeddings come with the batch."""
  cached = bool(setup.teacher_cache) if cached is None else cached
  student, teacher = step_models(config, setup, remat)
  teacher = None if cached else teacher
  fn = make_train_step(student, teacher, setup.loss, setup.mesh, setup.tx, setup.lr_fn,
                       batch_size or config.batch_size, config.microbatch_size, setup.masking)
  return jax.jit(fn, out_shardings=(setup.state_shardings, parallel.replicated(setup.mesh)),
                 donate_argnums=(0,))


def compile_train_steps(config, setup, abstracts: dict[int, dict] | None = None,
                        preflight_check: bool = True, **kwargs) -> dict[int, Any]:
  """The step compiled ahead for every text bucket: {token length: executable}, each
  checked against the devices' memory (train/preflight.py) unless `preflight_check` is
  off (benchmarks that measure the largest batch that fits)."""
  abstracts = batch_abstracts(config, setup) if abstracts is None else abstracts
  teacher_params = None if kwargs.get("cached", bool(setup.teacher_cache)) else \
      setup.teacher_params
  jitted = train_step(config, setup, **kwargs)
  compiled = {}
  for n, batch_abs in abstracts.items():
    t0 = time.time()
    compiled[n] = jitted.lower(setup.abstract_state, teacher_params, batch_abs).compile()
    log_compiled(compiled[n], f"compiled the train step for {n} text tokens in "
                 f"{time.time() - t0:.1f} s")
    if preflight_check:
      preflight.check_step(compiled[n], config, setup)  # refuses a step that cannot fit
  return compiled


def teacher_forward(config, setup, abstracts: dict[int, dict]) -> dict[int, Any]:
  """The teacher's embeddings of a global batch, compiled per text bucket (the teacher
  cache builder): rows stay sharded as the batch is. With an ensemble it takes the tuple
  of params (setup.teacher_params) and returns a tuple of outputs, one per teacher in
  member order."""
  teacher = step_models(config, setup)[1]
  rows = parallel.batch_sharding(setup.mesh, 2)
  out = {"image_embeds": rows, "text_embeds": rows,
         "logit_scale": parallel.replicated(setup.mesh)}
  if isinstance(teacher, tuple):
    out = tuple(out for _ in teacher)
    fn = lambda p, b: tuple(t.apply({"params": q}, b["images"], b["tokens"])  # noqa: E731
                            for t, q in zip(teacher, p))
  else:
    fn = lambda p, b: teacher.apply({"params": p}, b["images"], b["tokens"])  # noqa: E731
  return {n: jax.jit(fn, in_shardings=(setup.teacher_shardings,
                                       {k: v.sharding for k, v in a.items()}),
                     out_shardings=out).lower(setup.teacher_params, a).compile()
          for n, a in abstracts.items()}
