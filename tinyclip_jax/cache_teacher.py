"""Precompute the teacher's embeddings of a run's training batches.

  python -m tinyclip_jax.cache_teacher --config=configs/vit39m.py --out=gs://bucket/cache \
      --config.teacher.checkpoint=/ckpt/openai-vit-b-16 --config.data.train=...

It reads the same config as the run (teacher, data and its seed, batch size, mesh,
precision) and walks the same input pipeline for `--steps` (default total_steps)
steps, so the run that later sets --config.teacher.cache=PATH sees the very same
batches and crops and reads their teacher embeddings instead of computing them
(see tinyclip_jax/data/teacher_cache.py for the format and the checks). Multi-host
like training: the same command on every host, each writing its own rows.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from tinyclip_jax import distributed

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run as a program: `build` is importable beside the training entry point,
  which defines its own --config."""
  config_flags.DEFINE_config_file("config", None, "The training config the cache is for.",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Folder for the cache (local or gs://); must not exist yet.")
  flags.DEFINE_integer("steps", 0, "Steps to cache; 0 = the config's total_steps.")
  flags.DEFINE_integer("chunk", 100, "Steps per file.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Storage of the embeddings.")
  flags.mark_flags_as_required(["config", "out"])


def build(config, out: str, steps: int = 0, chunk: int = 100, dtype: str = "bfloat16") -> dict:
  """Writes the cache; returns its manifest."""
  from tinyclip_jax import paths  # pylint: disable=import-outside-toplevel
  config, out = paths.resolve_config(config), paths.resolve(out)
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import parallel  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import (  # pylint: disable=import-outside-toplevel
      pipeline, teacher_cache, text_buckets)
  from tinyclip_jax.train import compile as compile_lib, prepare  # pylint: disable=import-outside-toplevel

  steps = int(steps or config.total_steps)
  if dtype not in teacher_cache.DTYPES:
    raise prepare.SetupError(f"--dtype {dtype!r} is unknown; use one of {teacher_cache.DTYPES}.")
  if steps <= 0 or chunk <= 0:
    raise prepare.SetupError(f"--steps ({steps}) and --chunk ({chunk}) must be positive.")
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  if storage.listdir(out):
    raise prepare.SetupError(f"--out {out} exists and is not empty; give a new folder.")
  with config.unlocked():
    config.teacher.cache = ""
    config.masks.enabled = False  # the student does not matter here
  setup, _ = prepare.build(config, restoring=True)
  if setup.teacher_config is None:
    raise prepare.SetupError("the config has no teacher (teacher.model, .checkpoint and "
                             ".custom are empty); there is nothing to cache.")
  digest = teacher_cache.teacher_digest(parallel.host_gather(setup.teacher_params))
  cfg = setup.student_config
  data = pipeline.make_train_input(config.data, cfg.vision.image_size, cfg.text.context_length,
                                   config.batch_size)
  # Tokens cut to the text buckets as training cuts them (exact), one forward each.
  batch_abs = {n: compile_lib.batch_abstract(config, cfg, setup.mesh, text_length=n)
               for n in setup.text_lengths}
  forward = compile_lib.teacher_forward(config, setup, batch_abs)
  rows = parallel.batch_sharding(setup.mesh, 2)
  cut = text_buckets.Cut(setup.text_lengths)
  storage.makedirs(out)
  storage.check_writable(out)
  writer = teacher_cache.Writer(out, chunk, dtype)
  t0 = time.time()
  try:
    for s in range(1, steps + 1):
      host = cut(next(data))
      n = host["tokens"].shape[1]
      out_ = forward[n](setup.teacher_params, compile_lib.global_batch(host, batch_abs[n]))
      local = multihost_utils.global_array_to_host_local_array(
          (out_["image_embeds"], out_["text_embeds"]), setup.mesh, rows.spec)
      writer.add(*(jax.device_get(x) for x in local))
      if s % 100 == 0 or s == steps:
        logging.info("cached %d/%d steps (%.1f steps/s)", s, steps, s / (time.time() - t0))
  finally:
    pipeline.close_source(data)  # before exit: see ShardedPairs.close
  manifest = dict(teacher_cache.describe(config, setup.teacher_config, digest),
                  format=teacher_cache.FORMAT, steps=steps, chunk=chunk,
                  embed_dim=setup.teacher_config.embed_dim, precision=setup.policy.name,
                  dtype=dtype)
  writer.close(manifest)
  logging.info("wrote the teacher cache to %s", out)
  return manifest


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}.", file=sys.stderr)
    return 2
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize(FLAGS)
    build(FLAGS.config, FLAGS.out, FLAGS.steps, FLAGS.chunk, FLAGS.dtype)
  except (distributed.DistributedError, prepare.SetupError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
