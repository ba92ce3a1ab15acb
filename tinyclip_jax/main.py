"""Entry point: python -m tinyclip_jax.main --config=configs/vit39m.py --workdir=DIR

Flags only; everything else is importable (tinyclip_jax.train.runner.run) so a notebook
can drive the same code. Any config field can be overridden: --config.batch_size=4096.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tinyclip_jax import cli, distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and exports (local or gs://).")
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


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


def _compile_cache(config, workdir: str) -> None:
  """XLA's persistent compilation cache in config.compile_cache (the demo: in its
  workdir), so that a restart, and a stage compiling what an earlier one did (the
  demo's seeds), load the executable instead of compiling it again."""
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import paths, storage  # pylint: disable=import-outside-toplevel
  cache = config.get("compile_cache", "")
  if not cache and config.get("demo"):
    cache = storage.join(paths.resolve(workdir), "compile_cache")
  if cache:
    jax.config.update("jax_compilation_cache_dir", paths.resolve(cache))


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; pass settings as --config.FIELD=VALUE.",
          file=sys.stderr)
    return 2
  try:
    distributed.initialize(FLAGS)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import loop, prepare, runner  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.parallel import ReplicationError  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_partitionable", True)
  _hide_accelerators_from_tf()
  logging.get_absl_logger().addFilter(_QuietLibraries())
  config = FLAGS.config
  _compile_cache(config, FLAGS.workdir)
  logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if config.get("demo") and config.demo.get("cache"):  # configs/demo_cache.py
      from tinyclip_jax import demo_cache  # pylint: disable=import-outside-toplevel
      demo_cache.run(config, FLAGS.workdir)
    elif config.get("demo"):
      from tinyclip_jax import demo  # pylint: disable=import-outside-toplevel
      demo.run(config, FLAGS.workdir)
    else:
      runner.run(config, FLAGS.workdir)
  except (prepare.SetupError, ReplicationError, loop.NonFiniteError,
          pipeline.InputStalled, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag or config field is one sentence and exit 2."""
  return cli.parse_absl_flags(argv)


def entry() -> None:
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
