"""The training loop: prepare → resume → compile → step / log / eval / checkpoint → export.

Reads top to bottom; the step itself is in step.py, everything before the first
step in prepare.py.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from tinyclip_jax import checkpoint, evaluate, metrics as metrics_lib, parallel
from tinyclip_jax.data import pipeline
from tinyclip_jax.models import CLIP, merge_stats
from tinyclip_jax.train import prepare
from tinyclip_jax.train.step import make_train_step


class NonFiniteError(RuntimeError):
  """Too many non-finite losses in a row."""


def _global_batch(local: dict[str, np.ndarray], abstract: dict) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(abstract[k].sharding, v)
          for k, v in local.items()}


def _log_compiled(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info("compiled step: %.1f MiB arguments, %.1f MiB temporaries, %.1f MiB outputs",
                   mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
                   mem.output_size_in_bytes / 2**20)
  except Exception:  # noqa: BLE001 - not every backend reports memory
    logging.info("compiled step: memory analysis unavailable on this backend")


def _export(workdir: str, params, config) -> str:
  from tinyclip_jax import model_io  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "final")
  model_io.save_model(path, prepare.as_numpy(params), config, overwrite=True)
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`; resumes from the newest checkpoint there.

  Returns {"params", "student_config", "metrics" (last logged), "evals" (history)}.
  """
  prepare.validate(config)
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
  mgr = checkpoint.manager(workdir, config.keep_checkpoints)
  resuming = mgr.latest_step() is not None
  setup, state = prepare.build(config, restoring=resuming)
  student_cfg, mesh = setup.student_config, setup.mesh
  data = pipeline.make_train_input(config.data, student_cfg.vision.image_size,
                                   student_cfg.text.context_length, config.batch_size)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  start = 0
  if resuming:
    start, state, data_state = checkpoint.restore_latest(mgr, setup.abstract_state)
    data.set_state(data_state)
    if jax.process_index() == 0:
      metrics_lib.truncate_jsonl(jsonl, start)
    logging.info("resumed from step %d in %s", start, workdir)

  writer = metrics_lib.create_writer(workdir)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  student = CLIP(student_cfg, remat=config.remat, dtype=setup.dtype)
  teacher = CLIP(setup.teacher_config, dtype=setup.dtype) if setup.teacher_config else None
  step_fn = make_train_step(student, teacher, config.loss, mesh, setup.tx, setup.lr_fn,
                            config.batch_size, config.microbatch_size)
  batch_abs = prepare.batch_abstract(config, student_cfg, mesh)
  repl = parallel.replicated(mesh)
  jit_step = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.teacher_shardings,
                                            {k: v.sharding for k, v in batch_abs.items()}),
                     out_shardings=(setup.state_shardings, repl), donate_argnums=(0,))
  t0 = time.time()
  compiled = jit_step.lower(setup.abstract_state, setup.teacher_params, batch_abs).compile()
  logging.info("compiled the train step in %.1f s", time.time() - t0)
  _log_compiled(compiled)

  eval_task = None
  if config.eval.kind:
    eval_task = evaluate.load_task(config.eval.kind, student_cfg.vision.image_size,
                                   config.eval.num_examples)
  flops_per_pair = prepare.model_flops_per_pair(student_cfg, setup.teacher_config)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                             every_steps=config.log_every, every_secs=None)
  config_json = json.loads(config.to_json_best_effort())
  batches = pipeline.prefetch(data, config.data.prefetch)
  last, evals, prev_metrics = {}, [], None
  t_log, step_log = time.time(), start
  step = start
  for step in range(start + 1, config.total_steps + 1):
    local, data_state = next(batches)
    state, m = compiled(state, setup.teacher_params, _global_batch(local, batch_abs))
    # Check the previous step's count while this one runs (no per-step sync).
    if prev_metrics is not None and int(prev_metrics["nonfinite_in_a_row"]) >= config.max_nonfinite:
      raise NonFiniteError(f"{config.max_nonfinite} non-finite losses in a row before step "
                           f"{step}; lower optimizer.lr or check the data and teacher.")
    prev_metrics = m
    progress(step)
    final = step == config.total_steps
    do_eval = eval_task is not None and (step % config.eval_every == 0 or final)
    if step % config.log_every == 0 or final or do_eval:
      m = jax.device_get(m)
      now = time.time()
      pairs_s = (step - step_log) * config.batch_size / max(now - t_log, 1e-9)
      last = {k: float(v) for k, v in m.items()}
      last.update(pairs_per_s=pairs_s, model_flops_per_s=pairs_s * flops_per_pair)
      t_log, step_log = now, step
      if do_eval:
        ev = evaluate.zeroshot(student_cfg, merge_stats(state.params, state.batch_stats),
                               eval_task, config.eval.batch_size)
        evals.append({"step": step, **ev})
        last.update({f"eval/{k}": v for k, v in ev.items()})
      writer.write_scalars(step, last)
    if step % config.checkpoint_every == 0 or step == config.total_steps or \
        mgr.reached_preemption(step):
      checkpoint.save(mgr, step, state, data_state, config_json)
      if mgr.reached_preemption(step):
        mgr.wait_until_finished()
        logging.info("preempted: saved step %d", step)
        break
  mgr.wait_until_finished()
  writer.flush()
  weights = merge_stats(state.params, state.batch_stats)  # with BatchNorm running statistics
  export = _export(workdir, weights, student_cfg)
  logging.info("exported the student to %s", export)
  return {"params": weights, "student_config": student_cfg, "metrics": last,
          "evals": evals, "step": step}
