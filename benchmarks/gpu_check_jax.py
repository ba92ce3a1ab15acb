"""The JAX half of benchmarks/gpu_check.py, in a process of its own (JAX keeps most of the
GPU's memory until it exits): picks the largest batch that fits, then times the step at
three batch sizes and, at the largest, with remat and with cached teacher embeddings.

python -m benchmarks.gpu_check_jax PLAN BUDGET_S   (the driver runs it; one JSON line each)

The largest batch: the step is compiled (not run) at two rungs of the plan's ladder; the
compiled executables' own memory (arguments + outputs + temporaries) gives a line in the
batch size, which names the largest rung under 90% of what the device's allocator may
use. That rung is compiled to confirm it, stepping down while it does not fit, so no
config is run that the compiler says will not fit.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

from benchmarks import gpu_check, peak, train_step as ts

MEMORY_HEADROOM = 0.9  # of the allocator's limit: fragmentation, autotuning scratch
COMPILE_SHARE = 0.8    # of the budget: no new compile after this, the rest is for running


def largest_batch(ladder, memory_mb, budget_mb: float, probe: int) -> int | None:
  """The largest rung whose step fits `budget_mb`, by the line through the compiled memory
  of rungs probe and probe+1, confirmed by compiling it (memory_mb(b), cached by the
  caller; inf where it did not compile); None when not even the first rung fits."""
  a, b = ladder[probe], ladder[probe + 1]
  ma, mb = memory_mb(a), memory_mb(b)
  slope = (mb - ma) / (b - a) if math.isfinite(ma + mb) else math.inf
  predicted = [r for r in ladder if math.isfinite(slope) and ma + slope * (r - a) <= budget_mb]
  i = ladder.index(max(predicted)) if predicted else probe
  while i >= 0 and memory_mb(ladder[i]) > budget_mb:  # the line predicts; the compiler decides
    i -= 1
  return ladder[i] if i >= 0 else None


def batch_matrix(ladder, largest: int, fitting, n: int = 3) -> list[int]:
  """`n` batch sizes up to `largest`: it, the other rungs already compiled and fitting
  (no new compile), then the rungs just below."""
  chosen = [largest] + sorted((r for r in fitting if r < largest), reverse=True)
  chosen += [r for r in reversed(ladder) if r < largest and r not in chosen]
  return sorted(chosen[:n])


def device_memory():
  """(peak MB so far, where it comes from, the allocator's limit in MB or None)."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    limit = stats.get("bytes_limit")
    return (stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use",
            limit / 2**20 if limit else None)
  return ts.peak_rss_mb(), "process peak RSS (no device memory stats)", None


def _host_available_mb() -> float:
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


class Check:
  """The one setup (teacher, student state) every config shares, and the compiled steps."""

  def __init__(self, plan: gpu_check.Plan, budget_s: float):
    import jax  # pylint: disable=import-outside-toplevel
    self.plan, self.start = plan, time.monotonic()
    self.deadline = self.start + budget_s
    self.compile_deadline = self.start + COMPILE_SHARE * budget_s
    self.student_cfg, self.teacher_cfg = gpu_check.model_configs(plan)
    self._build()
    self.compiled: dict[tuple, object] = {}  # (batch, remat, cached) -> CompiledStep | error
    self.peak, self.peak_source = peak.device_peak(plan.precision, plan.cpu_matmul)
    self.device = jax.devices()[0].device_kind

  def _build(self):
    self.c, self.setup, self.state = ts.build_jax(self.student_cfg, self.teacher_cfg,
                                                  self.plan.ladder[0], self.plan.precision)

  def compile(self, batch: int, remat: bool = False, cached: bool = False):
    key = (batch, remat, cached)
    if key not in self.compiled:
      if time.monotonic() > self.compile_deadline:
        return RuntimeError("skipped: the time budget ran out before it compiled")
      try:
        self.compiled[key] = ts.compile_step(self.c, self.setup, batch, remat, cached)
      except Exception as e:  # noqa: BLE001  (too large to compile counts as not fitting)
        self.compiled[key] = e
    return self.compiled[key]

  def memory_mb(self, batch: int) -> float:
    step = self.compile(batch)
    if isinstance(step, Exception):
      return math.inf
    return step.memory_mb or 0.0

  def run(self, key, runs_left: int) -> dict:
    """One config's line: compile (already done), then warm-up and timed steps."""
    import jax  # pylint: disable=import-outside-toplevel
    step = self.compile(*key)
    if isinstance(step, Exception):
      raise step
    if any(x.is_deleted() for x in jax.tree.leaves(self.state)):  # donated to a failed step
      self._build()
      for s in self.compiled.values():  # the new teacher, so that the old one is freed
        if isinstance(s, ts.CompiledStep) and s.teacher_params is not None:
          s.teacher_params = self.setup.teacher_params
    before = device_memory()[0]
    batch = ts.random_batch(step.batch_abstract, self.student_cfg.text)
    deadline = time.monotonic() + (self.deadline - time.monotonic()) / runs_left
    times, loss, self.state = ts.time_jax(step, self.state, batch, self.plan.steps,
                                          self.plan.warmup, deadline)
    del batch
    after, source, _ = device_memory()
    step_s = statistics.median(times)
    flops = ts.flops_per_pair(self.setup, cached=key[2]) * key[0] / step_s
    return {"steps": len(times), "step_s": step_s, "pairs_per_s": key[0] / step_s,
            "model_flops_per_s": flops, "mfu": self.peak and flops / self.peak,
            "peak_flops_per_s": self.peak, "peak_source": self.peak_source,
            "peak_memory_mb": after, "peak_memory_source": source,
            # the process's peak only rises: a config below an earlier one's peak has no own figure
            "peak_memory_own": after > before,
            "compiled_memory_mb": step.memory_mb, "compile_s": step.compile_s, "loss": loss}


def configs(largest: int, batches) -> list[tuple[str, tuple]]:
  """(name, (batch, remat, cached)): the batch sizes, then remat and the teacher cache at
  the largest."""
  return ([("batch", (b, False, False)) for b in batches] +
          [("remat", (largest, True, False)), ("teacher_cache", (largest, False, True))])


def run(plan: gpu_check.Plan, budget_s: float, emit) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  check = Check(plan, budget_s)
  _, _, limit = device_memory()
  budget_mb = MEMORY_HEADROOM * (limit if limit else _host_available_mb())
  largest = largest_batch(plan.ladder, check.memory_mb, budget_mb, plan.probe)
  measured = {k[0]: s.memory_mb for k, s in check.compiled.items()
              if not isinstance(s, Exception)}  # the plain step's, all compiled so far
  failed = [(k[0], e) for k, e in check.compiled.items() if isinstance(e, Exception)]
  common = {"device": check.device, "student": plan.student, "teacher": plan.teacher,
            "image": plan.image, "precision": plan.precision}
  ladder = {"gpu_check": "ladder", **common, "jax": jax.__version__,
            "memory_budget_mb": budget_mb,
            "compiled_memory_mb": {str(b): m for b, m in sorted(measured.items())},
            "largest_batch": largest, "batches": None, "error": None}
  if largest is None:
    why = "".join(f"; batch {b} did not compile: {gpu_check.one_line(e)}" for b, e in failed[:1])
    emit(dict(ladder, error=f"no batch size of the ladder fits {budget_mb:.0f} MB{why}"))
    return
  batches = batch_matrix(plan.ladder, largest, [b for b, m in measured.items()
                                                if m is not None and m <= budget_mb])
  emit(dict(ladder, batches=batches))
  todo = configs(largest, batches)
  for _, key in todo:  # compile all first, to run them by rising memory (peak_memory_own)
    check.compile(*key)
  order = sorted(todo, key=lambda nk: getattr(check.compiled.get(nk[1]), "memory_mb", 0) or 0)
  for i, (name, key) in enumerate(order):
    line = {"gpu_check": "jax", "config": name, "batch": key[0], "remat": key[1],
            "teacher_cache": key[2], **common}
    try:
      line.update(check.run(key, len(order) - i), error=None)
    except Exception as e:  # noqa: BLE001  (one config's failure is its line; the rest run)
      line["error"] = gpu_check.one_line(e)
    emit(line)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  emit = lambda line: print(json.dumps(line), flush=True)  # noqa: E731
  run(gpu_check.PLANS[argv[0]], float(argv[1]), emit)
  return 0


if __name__ == "__main__":
  sys.exit(main())
