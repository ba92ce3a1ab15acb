"""Trains exactly one phase: input → compile → step / log / eval / checkpoint.

It knows nothing of other phases: the runner (runner.py) hands it the phase, its
setup (model, optimizer, shardings; the teacher on device) and where it starts
(a restored checkpoint, or fresh weights at the phase's first step), and gets back
the phase's last state. The step itself is in step.py.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from clu import periodic_actions

from tinyclip_jax import checkpoint, faults, parallel, workdir as workdir_lib
from tinyclip_jax.data import pipeline, sample_cache, synthetic, teacher_cache, text_buckets
from tinyclip_jax.eval import suite as eval_suite
from tinyclip_jax.models import count_params, merge_stats
from tinyclip_jax.train import compile as compile_lib, masking, prepare, profiling
from tinyclip_jax.train.plan import Phase


class NonFiniteError(RuntimeError):
  """Too many non-finite losses in a row."""


@dataclasses.dataclass
class Start:
  """Where a phase starts: its train state at `step`, and the input position then
  (None: the input's beginning)."""
  step: int
  state: Any
  data_state: dict | None = None
  save: bool = False  # checkpoint the start first (a phase entered by a transition)


@dataclasses.dataclass
class Result:
  state: Any
  step: int
  data_state: dict | None   # the input position after the last step (host-local)
  metrics: dict             # the last logged metrics
  evals: list               # every evaluation of the phase
  preempted: bool = False

  @property
  def weights(self):
    return merge_stats(self.state.params, self.state.batch_stats)


@dataclasses.dataclass
class Outputs:
  """A stage's checkpoints, metric writer and preemption notice (shared by its phases).
  The writer is opened by the first phase that gets past its input check, so a run
  whose input has nothing usable writes nothing."""
  mgr: Any
  notice: Any
  config_json: dict
  open_writer: Callable[[int], Any]  # start step → writer
  _writer: Any = None

  def writer(self, start: int):
    if self._writer is None:
      self._writer = self.open_writer(start)
    return self._writer

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _open_input(config: ml_collections.ConfigDict, setup, start: Start):
  """The phase's batches, on device, cut to the text bucket every process agrees on."""
  cfg = setup.student_config
  per_sample = setup.teacher_cache and sample_cache.is_sample_cache(setup.teacher_cache[1])
  if per_sample:  # the cache's embeddings come with each sample (data/sample_cache.py)
    path, manifest = setup.teacher_cache
    from tinyclip_jax.data import shards  # pylint: disable=import-outside-toplevel
    try:
      sample_cache.check_input(manifest, shards.resolve(config.data.train),
                               cfg.vision.image_size, cfg.text.context_length, path)
    except sample_cache.CacheError as e:
      raise prepare.SetupError(str(e)) from e
  data = pipeline.make_train_input(config.data, cfg.vision.image_size,
                                   cfg.text.context_length, config.batch_size,
                                   setup.teacher_cache if per_sample else None)
  if start.data_state is not None:
    try:
      data.set_state(pipeline.host_state(start.data_state))
    except ValueError as e:  # e.g. a position the data config cannot hold
      pipeline.close_source(data)
      raise prepare.SetupError(f"the checkpoint of step {start.step} cannot resume this run: "
                               f"{e}") from e
  if setup.teacher_cache and not per_sample:
    path, manifest = setup.teacher_cache
    try:
      teacher_cache.check_input(data.get_state(), path)
    except teacher_cache.CacheError as e:
      pipeline.close_source(data)
      raise prepare.SetupError(str(e)) from e
    data = teacher_cache.CachedTeacher(data, teacher_cache.Reader(path, manifest), start.step,
                                       config.batch_size // jax.process_count())
  abstracts = compile_lib.batch_abstracts(config, setup)
  cut = text_buckets.Cut(setup.text_lengths)

  def to_device(local):  # on the prefetch thread
    local = cut(local)
    return compile_lib.global_batch(local, abstracts[local["tokens"].shape[1]])
  return pipeline.prefetch(data, config.data.prefetch, to_device), cut, abstracts


def _evaluate(suite, setup, state, step: int) -> dict:
  """The eval suite on the student; in the masked phase, on the model the current
  deterministic gates prune to (which equals the masked model), whose structure is
  written too. Results also go to WORKDIR/evals/step_N.json."""
  cfg, params = setup.student_config, merge_stats(state.params, state.batch_stats)
  if setup.masking is not None:
    params, pruned_cfg, gates = masking.prune_state(params, cfg, state.masks, setup.masking)
    masking.write_structure(suite.workdir, step, cfg, "masked", gates, count_params(params))
    cfg = pruned_cfg
  return suite.run(cfg, params, setup.mesh, step)


def _noticed(out: Outputs, start: Start) -> bool:
  """A preemption notice before the first step (one process: the handler's flag; several
  processes agree at a step, in the loop): stop without compiling or stepping further.
  The phase's start is already saved, unless it is the run's very beginning."""
  if jax.process_count() > 1 or not out.notice.received:
    return False
  out.mgr.wait_until_finished()
  logging.info("preempted before step %d; the checkpoint of step %d stands", start.step + 1,
               start.step)
  return True


def train_phase(phase: Phase, setup, start: Start, out: Outputs) -> Result:
  """Steps start.step+1 … phase.last_step of `phase`."""
  config, workdir = phase.config, phase.workdir
  suite = eval_suite.Suite(config.eval, setup.student_config.vision.image_size, workdir,
                           synthetic.appearance(config.data))
  batches, cut, abstracts = _open_input(config, setup, start)
  monitor = pipeline.InputMonitor(config.data)
  sharded_input = config.data.kind != "synthetic"
  state, step, data_state = start.state, start.step, start.data_state
  last, evals, window = {}, [], None
  # Every thread and reader this phase started ends before it returns, error or not: a
  # prefetch thread inside XLA or a tf.data iterator left to interpreter shutdown
  # aborts or hangs the process after the work is done.
  try:
    if sharded_input:  # no usable input: stop before compiling or writing anything
      monitor.check(pipeline.gather_state(batches.peek()[1]))
    writer = out.writer(start.step)
    if start.save:  # a transition's result: a resume must find it
      writer.checkpoint(step)
      checkpoint.save(out.mgr, step, state, pipeline.gather_state(data_state or {}),
                      out.config_json, setup.student_config.to_dict())
    if _noticed(out, start):  # a SIGTERM before this phase compiled: stop now
      return Result(state, step, data_state, {}, [], preempted=True)
    compiled = compile_lib.compile_train_steps(config, setup, abstracts)
    if _noticed(out, start):
      return Result(state, step, data_state, {}, [], preempted=True)
    # Model FLOPs per pair at each bucket's text length, summed over the steps logged.
    flops_per_pair = {n: prepare.model_flops_per_pair(setup.student_config,
                                                      setup.teacher_configs, n)
                      for n in setup.text_lengths}
    progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                               every_steps=config.log_every, every_secs=None)
    model_json = setup.student_config.to_dict()
    prev, t_log, step_log, flops_log = None, time.time(), step, 0.0
    window = profiling.StepWindow(config, workdir)
    for step in range(start.step + 1, phase.last_step + 1):
      batch, data_state = next(batches)
      window.before(step)
      text_length = batch["tokens"].shape[1]  # the bucket every process agreed on
      state, m = compiled[text_length](state, setup.teacher_params, batch)
      flops_log += flops_per_pair[text_length] * config.batch_size
      window.after(step, m)
      # Check the previous step's count while this one runs (no per-step sync).
      if prev is not None and int(prev["nonfinite_in_a_row"]) >= config.max_nonfinite:
        raise NonFiniteError(f"{config.max_nonfinite} non-finite losses in a row before step "
                             f"{step}; lower optimizer.lr or check the data and teacher.")
      prev = m
      progress(step)
      final = step == config.total_steps
      do_eval = bool(suite.tasks) and (step % config.eval_every == 0 or final)
      # The masked phase's last state is not saved: the next phase saves its pruned start.
      # A preemption notice at the masked phase's end is acted on by the next phase.
      masked_end = phase.masks and step == phase.last_step
      faults.at_step(step, phase.name, kinds=("term_at_step",))
      preempt = out.notice.reached(step) and not masked_end
      do_save = not masked_end and (preempt or step % config.checkpoint_every == 0 or final)
      do_log = step % config.log_every == 0 or final or do_eval
      # Every process reaches these steps together: the input state is gathered and
      # checked (a stalled input stops all processes here, before anything is saved).
      gathered = (pipeline.gather_state(data_state)
                  if do_save or (do_log and sharded_input) else None)
      if gathered is not None and sharded_input:
        monitor.check(gathered)
      if do_log:
        m = jax.device_get(m)
        now = time.time()
        seconds = max(now - t_log, 1e-9)
        pairs_s = (step - step_log) * config.batch_size / seconds
        last = {k: float(v) for k, v in m.items()}
        last.update(pairs_per_s=pairs_s, model_flops_per_s=flops_log / seconds,
                    text_bucket=text_length)
        if sharded_input:
          last.update(pipeline.skipped_metrics(gathered))
        t_log, step_log, flops_log = now, step, 0.0
        if do_eval:
          ev = _evaluate(suite, setup, state, step)
          evals.append({"step": step, **ev})
          last.update({f"eval/{k}": v for k, v in ev.items()})
        writer.write_scalars(step, last)
      if do_save:
        writer.checkpoint(step)  # the metrics up to this step are stored before it
        checkpoint.save(out.mgr, step, state, gathered, out.config_json, model_json)
      # orbax's wait takes barriers: only a single process may settle alone.
      faults.at_step(step, phase.name, out.mgr.wait_until_finished
                     if jax.process_count() == 1 else None, kinds=("kill_at_step",))
      if preempt:
        out.mgr.wait_until_finished()
        logging.info("preempted: saved step %d", step)
        return Result(state, step, data_state, last, evals, preempted=True)
    out.mgr.wait_until_finished()
    return Result(state, step, data_state, last, evals)
  finally:
    if window is not None:
      window.close(state)  # a trace window that runs past this phase ends with it
    cut.close()  # first: ends a wait for another process's length, so the thread joins
    batches.close()


def export(workdir: str, weights, config) -> str:
  """WORKDIR/final: gathered on every process; process 0 writes, the others wait."""
  from tinyclip_jax import model_io  # pylint: disable=import-outside-toplevel
  path = workdir_lib.final(workdir)
  host = parallel.host_gather(weights)
  if jax.process_index() == 0:
    model_io.save_model(path, host, config, overwrite=True)
  parallel.barrier("export")
  return path
