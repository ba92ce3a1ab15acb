"""Entry point: python -m tinyclip_jax.main --config=configs/vit39m.py --workdir=DIR

Flags only; everything else is importable (tinyclip_jax.train.loop.run) so a notebook
can drive the same code. Any config field can be overridden: --config.batch_size=4096.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and exports (local or gs://).")
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
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


def init_distributed() -> None:
  """jax.distributed.initialize() per --distributed; before any other JAX call."""
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if FLAGS.distributed == "off":
    return
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError("give --coordinator_address, --num_processes and --process_id "
                             "together (or none of them, to let SLURM / the TPU VM say).")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise DistributedError(f"--process_id {FLAGS.process_id} is not in [0, --num_processes="
                             f"{FLAGS.num_processes}); number the processes 0 … N-1.")
  elif FLAGS.distributed == "auto" and not _cluster_env():
    return
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives across processes
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if FLAGS.coordinator_address:
    kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if FLAGS.process_id != 0:  # XLA aborts the process on a failed connect: look first
      _wait_for(FLAGS.coordinator_address, FLAGS.distributed_timeout)
  try:
    jax.distributed.initialize(initialization_timeout=FLAGS.distributed_timeout, **kwargs)
  except Exception as e:  # noqa: BLE001 - jax raises several kinds; all mean the same here
    where = FLAGS.coordinator_address or "the address SLURM / the TPU VM gives"
    raise DistributedError(
        f"could not join the cluster through the coordinator at {where} within "
        f"{FLAGS.distributed_timeout} s ({type(e).__name__}); check that process 0 runs, "
        "that the address is reachable and that every process has the same --num_processes."
    ) from None
  if FLAGS.num_processes and jax.process_count() != FLAGS.num_processes:
    raise DistributedError(f"the cluster has {jax.process_count()} processes but "
                           f"--num_processes is {FLAGS.num_processes}; start them all alike.")


def _hide_accelerators_from_tf() -> None:
  """tf.data may run in this process; it must never take GPU/TPU memory."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # noqa: BLE001 - TF not imported or already initialized
    pass


class _QuietLibraries(logging.logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; pass settings as --config.FIELD=VALUE.",
          file=sys.stderr)
    return 2
  try:
    init_distributed()
  except DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import loop, prepare, stages  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_partitionable", True)
  _hide_accelerators_from_tf()
  logging.get_absl_logger().addFilter(_QuietLibraries())
  config = FLAGS.config
  logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if config.get("demo"):
      from tinyclip_jax import demo  # pylint: disable=import-outside-toplevel
      demo.run(config, FLAGS.workdir)
    else:
      stages.run(config, FLAGS.workdir)
  except (prepare.SetupError, loop.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag or config field is one sentence and exit 2
  (absl and ml_collections would print a traceback or usage text and exit 1)."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("seed")  # a config file that failed to load raises when first read
    return rest
  except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD the config lacks
    text = str(e).replace("\\", "")
    missing = re.search(r"'(\w+)'", text)
    name = missing.group(1) if missing else ""
    flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and
                 name in a.split("=", 1)[0].split(".")), "a --config.FIELD flag")
    hint = re.search(r'Did you mean "(\w+)"', text)
    fix = f"did you mean {hint.group(1)!r}?" if hint else "check the spelling"
    msg = (f"{flag} names no field of the config ({fix}); every field and its default is in "
           "tinyclip_jax/train/defaults.py.")
  except (flags.Error, OSError) as e:  # bad value, unknown flag, missing config file
    msg = " ".join(str(e).split()).rstrip(".") + "; see --helpfull for the flags."
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def entry() -> None:
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
