"""The training loop: prepare → resume → compile → step / log / eval / checkpoint → export.

Reads top to bottom; the step itself is in step.py, everything before the first
step in prepare.py.
"""
from __future__ import annotations

import dataclasses
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
from tinyclip_jax.data import pipeline, teacher_cache, text_buckets
from tinyclip_jax.eval import tasks as eval_tasks
from tinyclip_jax.models import CLIPConfig, count_params, merge_stats
from tinyclip_jax.train import masking, preflight, prepare, profiling
from tinyclip_jax.train.step import make_train_step


class NonFiniteError(RuntimeError):
  """Too many non-finite losses in a row."""


def _global_batch(local: dict[str, np.ndarray], abstract: dict) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(abstract[k].sharding, v)
          for k, v in local.items()}


def _log_compiled(compiled, config, setup) -> None:
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info("compiled step: %.1f MiB arguments, %.1f MiB temporaries, %.1f MiB outputs",
                   mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
                   mem.output_size_in_bytes / 2**20)
  except Exception:  # noqa: BLE001 - not every backend reports memory
    logging.info("compiled step: memory analysis unavailable on this backend")
  preflight.check_step(compiled, config, setup)  # refuses a step that cannot fit


def _export(workdir: str, params, config) -> str:
  """Params gathered on every process; process 0 writes the folder, the others wait."""
  from tinyclip_jax import model_io  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "final")
  host = prepare.as_numpy(params)
  if jax.process_index() == 0:
    model_io.save_model(path, host, config, overwrite=True)
  parallel.barrier("export")
  return path


@dataclasses.dataclass
class _Run:
  """What every phase of a run shares."""
  config: ml_collections.ConfigDict
  workdir: str
  mgr: Any
  writer: Any
  batches: Any
  eval_task: Any
  suite: list
  config_json: dict
  evals: list
  last: dict
  data_state: dict = dataclasses.field(default_factory=dict)
  monitor: Any = None


def _batch_abstracts(config, setup) -> dict[int, dict]:
  """The global batch of each text bucket, by its token length."""
  dim = setup.teacher_config.embed_dim if setup.teacher_cache else 0
  return {n: prepare.batch_abstract(config, setup.student_config, setup.mesh, dim, n)
          for n in setup.text_lengths}


def _compile(config, setup) -> dict[int, Any]:
  """The train step compiled ahead for every text bucket: {token length: executable}."""
  mesh = setup.mesh
  student, teacher = prepare.step_models(config, setup)
  step_fn = make_train_step(student, teacher, config.loss, mesh, setup.tx, setup.lr_fn,
                            config.batch_size, config.microbatch_size, setup.masking)
  compiled = {}
  for n, batch_abs in _batch_abstracts(config, setup).items():
    jit_step = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.teacher_shardings,
                                              {k: v.sharding for k, v in batch_abs.items()}),
                       out_shardings=(setup.state_shardings, parallel.replicated(mesh)),
                       donate_argnums=(0,))
    t0 = time.time()
    compiled[n] = jit_step.lower(setup.abstract_state, setup.teacher_params, batch_abs).compile()
    logging.info("compiled the train step for %d text tokens in %.1f s", n, time.time() - t0)
    _log_compiled(compiled[n], config, setup)  # each bucket pre-flight checked
  return compiled


def _evaluate(run: _Run, setup, state, step: int) -> dict:
  """Zero-shot / retrieval evals of the student; in the masked phase, of the model the
  current deterministic gates prune to (which equals the masked model), plus its
  structure. Results also go to WORKDIR/evals/step_N.json."""
  cfg, params, ev = setup.student_config, merge_stats(state.params, state.batch_stats), {}
  if setup.masking is not None:
    params, pruned_cfg, gates = masking.prune_state(params, cfg, state.masks, setup.masking)
    masking.write_structure(run.workdir, step, cfg, "masked", gates, count_params(params))
    cfg = pruned_cfg
  c = run.config.eval
  if run.eval_task is not None:
    ev = evaluate.zeroshot(cfg, params, run.eval_task, c.batch_size)
  for t in run.suite:
    ev.update({f"{t}/{k}": v for k, v in eval_tasks.run(
        t, cfg, params, data_dir=c.data_dir, batch=c.batch_size, max_examples=c.max_examples,
        mesh=setup.mesh).items()})
  eval_tasks.write_result(run.workdir, step, ev)
  return ev


def _train(run: _Run, setup, state, start: int, end: int) -> tuple[Any, int, bool]:
  """Steps start+1 … end of one phase → (state, last step, preempted)."""
  config = run.config
  compiled = _compile(config, setup)
  # Model FLOPs per pair at each bucket's text length, summed over the steps logged.
  flops_per_pair = {n: prepare.model_flops_per_pair(setup.student_config, setup.teacher_config,
                                                    n) for n in setup.text_lengths}
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                             every_steps=config.log_every, every_secs=None)
  model_json = setup.student_config.to_dict()
  prev_metrics, t_log, step_log, step, flops_log = None, time.time(), start, start, 0.0
  window = profiling.StepWindow(config, run.workdir)
  sharded_input = config.data.kind != "synthetic"
  for step in range(start + 1, end + 1):
    batch, data_state = next(run.batches)
    window.before(step)
    text_length = batch["tokens"].shape[1]  # the bucket every process agreed on
    state, m = compiled[text_length](state, setup.teacher_params, batch)
    flops_log += flops_per_pair[text_length] * config.batch_size
    window.after(step, m)
    # Check the previous step's count while this one runs (no per-step sync).
    if prev_metrics is not None and int(prev_metrics["nonfinite_in_a_row"]) >= config.max_nonfinite:
      raise NonFiniteError(f"{config.max_nonfinite} non-finite losses in a row before step "
                           f"{step}; lower optimizer.lr or check the data and teacher.")
    prev_metrics = m
    progress(step)
    final = step == config.total_steps
    do_eval = (run.eval_task is not None or run.suite) and (step % config.eval_every == 0 or
                                                            final)
    masked_end = setup.masking is not None and step == end
    do_save = not masked_end and (step % config.checkpoint_every == 0 or final or
                                  run.mgr.reached_preemption(step))
    do_log = step % config.log_every == 0 or final or do_eval
    # Every process reaches these steps together: the input state is gathered and
    # checked (a stalled input stops all processes here, before anything is saved).
    gathered = (pipeline.gather_state(data_state)
                if do_save or (do_log and sharded_input) else None)
    if gathered is not None and sharded_input:
      run.monitor.check(gathered)
    if do_log:
      m = jax.device_get(m)
      now = time.time()
      seconds = max(now - t_log, 1e-9)
      pairs_s = (step - step_log) * config.batch_size / seconds
      run.last = {k: float(v) for k, v in m.items()}
      run.last.update(pairs_per_s=pairs_s, model_flops_per_s=flops_log / seconds,
                      text_bucket=text_length)
      if sharded_input:
        run.last.update(pipeline.skipped_metrics(gathered))
      t_log, step_log, flops_log = now, step, 0.0
      if do_eval:
        ev = _evaluate(run, setup, state, step)
        run.evals.append({"step": step, **ev})
        run.last.update({f"eval/{k}": v for k, v in ev.items()})
      run.writer.write_scalars(step, run.last)
    # The masked phase's last state is saved after pruning (by the caller).
    if do_save:
      checkpoint.save(run.mgr, step, state, gathered, run.config_json, model_json)
      if run.mgr.reached_preemption(step):
        run.mgr.wait_until_finished()
        logging.info("preempted: saved step %d", step)
        window.close(state)
        return state, step, True
    run.data_state = data_state
  window.close(state)  # a window that runs past this phase ends with it
  return state, step, False


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`; resumes from the newest checkpoint there.

  With masks on, steps 1 … masks.prune_step learn the structure masks; the student
  is then pruned and distilled on to total_steps (the checkpoint records which).
  Returns {"params", "student_config", "metrics" (last logged), "evals" (history)}.
  """
  prepare.validate(config)
  mgr = checkpoint.manager(workdir, config.keep_checkpoints)
  latest = mgr.latest_step()
  resuming = latest is not None
  pruned = None
  if resuming and config.masks.enabled and latest >= config.masks.prune_step:
    model = checkpoint.latest_model(mgr)
    if model is None:
      raise prepare.SetupError(f"the checkpoint of step {latest} in {workdir} has no model "
                               "config, so the pruned student cannot be rebuilt; start a new "
                               "workdir.")
    pruned = prepare.Pruned(CLIPConfig.from_dict(model))
  setup, state = prepare.build(config, restoring=resuming, pruned=pruned)
  student_cfg = setup.student_config
  data = pipeline.make_train_input(config.data, student_cfg.vision.image_size,
                                   student_cfg.text.context_length, config.batch_size)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  start = 0
  if resuming:
    start, state, data_state = checkpoint.restore_latest(mgr, setup.abstract_state)
    data.set_state(pipeline.host_state(data_state))
    if jax.process_index() == 0:
      metrics_lib.truncate_jsonl(jsonl, start)
    logging.info("resumed from step %d in %s", start, workdir)

  eval_task = None
  if config.eval.kind:
    eval_task = evaluate.load_task(config.eval.kind, student_cfg.vision.image_size,
                                   config.eval.num_examples)
  if setup.teacher_cache:
    path, manifest = setup.teacher_cache
    data = teacher_cache.CachedTeacher(data, teacher_cache.Reader(path, manifest), start,
                                       config.batch_size // jax.process_count())
  # The prefetch thread also cuts the tokens to the bucket all processes agree on
  # (text_buckets.Agreement: safe there) and makes the global device arrays (the
  # batch's shapes and sharding are the same on both sides of a prune step).
  batch_abs = _batch_abstracts(config, setup)
  cut = text_buckets.Cut(setup.text_lengths)

  def to_device(local):
    local = cut(local)
    return _global_batch(local, batch_abs[local["tokens"].shape[1]])
  batches = pipeline.prefetch(data, config.data.prefetch, to_device)
  monitor = pipeline.InputMonitor(config.data)
  writer = None
  # Every thread and reader this run started ends before it returns, error or not: a
  # prefetch thread inside XLA or a tf.data iterator left to interpreter shutdown
  # aborts or hangs the process after the work is done.
  try:
    if config.data.kind != "synthetic":  # no usable input: stop before writing anything
      monitor.check(pipeline.gather_state(batches.peek()[1]))
    if "://" not in workdir:
      os.makedirs(workdir, exist_ok=True)
    writer = metrics_lib.create_writer(workdir)
    if start == 0:
      writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
    run_ = _Run(config, workdir, mgr, writer, batches, eval_task,
                eval_tasks.task_list(config.eval.tasks), json.loads(config.to_json_best_effort()),
                [], {}, monitor=monitor)
    end = config.masks.prune_step if setup.masking is not None else config.total_steps
    state, step, preempted = _train(run_, setup, state, start, end)
    if setup.masking is not None and not preempted:
      params, cfg, gates = masking.prune_state(state.params, student_cfg, state.masks,
                                               setup.masking)
      masking.write_structure(workdir, step, student_cfg, "pruned", gates, count_params(params))
      # The teacher stays on device: loading it again would hold two copies at once.
      setup, state = prepare.build(config, restoring=False,
                                   pruned=prepare.Pruned(cfg, params, step), teacher_from=setup)
      checkpoint.save(mgr, step, state, pipeline.gather_state(run_.data_state),
                      run_.config_json, cfg.to_dict())
      state, step, preempted = _train(run_, setup, state, step, config.total_steps)
    mgr.wait_until_finished()
  finally:
    cut.close()  # first: ends a wait for another process's length, so the thread joins
    batches.close()
    mgr.close()
    if writer is not None:
      writer.close()
  weights = merge_stats(state.params, state.batch_stats)  # with BatchNorm running statistics
  if preempted:
    return {"params": weights, "student_config": setup.student_config,
            "metrics": run_.last, "evals": run_.evals, "step": step, "preempted": True}
  export = _export(workdir, weights, setup.student_config)
  logging.info("exported the student to %s", export)
  return {"params": weights, "student_config": setup.student_config, "metrics": run_.last,
          "evals": run_.evals, "step": step}
