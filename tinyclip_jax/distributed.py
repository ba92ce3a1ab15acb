"""Joining a multi-host cluster: flags and jax.distributed.initialize().

Shared by every entry point that may run on several hosts (training, the teacher
cache). On TPU VM slices and under SLURM, jax finds the cluster itself; elsewhere
--coordinator_address, --num_processes and --process_id name it.
"""
from __future__ import annotations

import os

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Multi-host: 'auto' joins a cluster when SLURM or a TPU VM slice says there "
                  "is one, or when --coordinator_address is given; 'on' always calls "
                  "jax.distributed.initialize(); 'off' never.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit clusters).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit clusters).")
flags.DEFINE_integer("distributed_timeout", 300,
                     "Seconds to wait for every process to reach the coordinator.")


class DistributedError(RuntimeError):
  """A multi-host setup problem the user must fix."""


class _Flags:
  """The cluster flags of a flag holder, with their defaults where it lacks them."""
  DEFAULTS = {"distributed": "auto", "coordinator_address": None, "num_processes": None,
              "process_id": None, "distributed_timeout": 300}

  def __init__(self, holder):
    for name, default in self.DEFAULTS.items():
      try:
        value = getattr(holder, name)
      except AttributeError:
        value = default
      setattr(self, name, value)


def _cluster_env() -> bool:
  """True when the environment describes several hosts (SLURM, TPU VM slice)."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env


def _wait_for(address: str, timeout: float) -> None:
  """Returns once host:port accepts TCP connections; DistributedError after `timeout`."""
  import socket  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address {address!r} is not host:port.")
  deadline = time.time() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError:
      if time.time() >= deadline:
        raise DistributedError(
            f"could not reach the coordinator at {address} within {timeout} s; start process 0 "
            "there first, or fix --coordinator_address (it must be process 0's host:port)."
        ) from None
      time.sleep(0.5)


def initialize(fv=None) -> None:
  """jax.distributed.initialize() per --distributed; before any other JAX call.

  `fv`: where to read the flags (absl's FLAGS by default); missing ones take their
  defaults, so a program that drives `main` with a plain namespace stays single-host."""
  fv = _Flags(FLAGS if fv is None else fv)
  explicit = [fv.coordinator_address, fv.num_processes, fv.process_id]
  if fv.distributed == "off":
    return
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError("give --coordinator_address, --num_processes and --process_id "
                             "together (or none of them, to let SLURM / the TPU VM say).")
    if not 0 <= fv.process_id < fv.num_processes:
      raise DistributedError(f"--process_id {fv.process_id} is not in [0, --num_processes="
                             f"{fv.num_processes}); number the processes 0 … N-1.")
  elif fv.distributed == "auto" and not _cluster_env():
    return
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives across processes
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if fv.coordinator_address:
    kwargs = dict(coordinator_address=fv.coordinator_address,
                  num_processes=fv.num_processes, process_id=fv.process_id)
    if fv.process_id != 0:  # XLA aborts the process on a failed connect: look first
      _wait_for(fv.coordinator_address, fv.distributed_timeout)
  try:
    jax.distributed.initialize(initialization_timeout=fv.distributed_timeout, **kwargs)
  except Exception as e:  # noqa: BLE001 - jax raises several kinds; all mean the same here
    where = fv.coordinator_address or "the address SLURM / the TPU VM gives"
    raise DistributedError(
        f"could not join the cluster through the coordinator at {where} within "
        f"{fv.distributed_timeout} s ({type(e).__name__}); check that process 0 runs, "
        "that the address is reachable and that every process has the same --num_processes."
    ) from None
  if fv.num_processes and jax.process_count() != fv.num_processes:
    raise DistributedError(f"the cluster has {jax.process_count()} processes but "
                           f"--num_processes is {fv.num_processes}; start them all alike.")
