"""Pre-flight memory check: the compiled step against the devices' memory, before the
first step, so a run that cannot fit stops at start with settings that would fit
instead of failing hours into a pod job.

The compiled executable accounts its own memory per device: arguments + outputs +
temporaries − what the outputs alias (the donated state). The device says how much
its allocator may use (`memory_stats()['bytes_limit']`, GPU and TPU); CPUs report no
limit and are not checked.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from absl import logging

from tinyclip_jax import parallel
from tinyclip_jax.train.prepare import SetupError
from tinyclip_jax.train.step import uses_batch_norm

GIB = 2 ** 30


def step_bytes(compiled) -> dict[str, int] | None:
  """{"fixed": arguments + outputs − aliased, "temp": temporaries} per device, or None
  where the backend gives no memory analysis."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports memory
    return None
  if mem is None:
    return None
  fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return {"fixed": int(fixed), "temp": int(mem.temp_size_in_bytes)}


def device_limit(devices: Sequence[Any]) -> tuple[int, str] | None:
  """(bytes, device kind) of the device with the least memory, or None where no
  device reports a limit (CPU)."""
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
      stats = None
    if stats and stats.get("bytes_limit"):
      limits.append((int(stats["bytes_limit"]), d.device_kind))
  return min(limits) if limits else None


def fitting_rows(need: dict[str, int], limit: int, rows: int) -> int:
  """The most rows per device (microbatch) whose step would fit, assuming temporaries
  grow in proportion to the rows per microbatch and arguments do not; 0 when the
  arguments alone do not fit."""
  room = limit - need["fixed"]
  if room <= 0:
    return 0
  return rows if need["temp"] <= room else int(rows * room / max(need["temp"], 1))


def _advice(need, limit, per_device: int, micro: int, remat: bool, can_microbatch: bool) -> str:
  rows = micro or per_device
  fit = fitting_rows(need, limit, rows)
  if fit == 0:
    return ("the parameters, optimizer state, teacher and batch alone take "
            f"{need['fixed'] / GIB:.1f} GiB, so shard them over more devices (mesh.fsdp) or "
            "cache the teacher's embeddings (teacher.cache)")
  remat_hint = "" if remat else ", or remat=True (recomputed activations) with a larger one"
  divisors = [m for m in range(1, per_device + 1) if per_device % m == 0 and m <= fit]
  if can_microbatch and divisors and divisors[-1] < rows:
    return (f"microbatch_size={divisors[-1]} would fit by the compiler's figures (temporaries "
            f"grow with the rows per microbatch){remat_hint}")
  return "set remat=True or lower batch_size" if not remat else "lower batch_size"


def check_memory(compiled, devices: Sequence[Any], *, per_device_batch: int,
                 microbatch_size: int = 0, remat: bool = False,
                 can_microbatch: bool = True) -> None:
  """Raises SetupError (one sentence: the need, the limit, settings that would fit)
  when the compiled step needs more memory per device than the devices have."""
  need = step_bytes(compiled)
  limit = device_limit(devices)
  if need is None or limit is None:
    logging.info("pre-flight memory check skipped: %s", "the backend gives no memory analysis"
                 if need is None else "the devices report no memory limit (CPU)")
    return
  total, (limit_bytes, kind) = need["fixed"] + need["temp"], limit
  logging.info("pre-flight memory check: the step needs %.2f GiB of %.2f GiB per device",
               total / GIB, limit_bytes / GIB)
  if total > limit_bytes:
    raise SetupError(
        f"the compiled train step needs {total / GIB:.1f} GiB per device but each {kind} has "
        f"{limit_bytes / GIB:.1f} GiB; "
        + _advice(need, limit_bytes, per_device_batch, microbatch_size, remat, can_microbatch)
        + ".")


def check_step(compiled, config, setup) -> None:
  """check_memory for the step of `config` as prepare.build set it up."""
  local = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
  check_memory(compiled, local,
               per_device_batch=config.batch_size // parallel.batch_size_per_axis(setup.mesh),
               microbatch_size=int(config.microbatch_size), remat=bool(config.remat),
               can_microbatch=not uses_batch_norm(setup.student_config))
