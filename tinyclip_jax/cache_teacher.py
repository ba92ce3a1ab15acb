"""Precompute the teacher's embeddings once, for any number of students.

Per sample (webdataset/tfrecord shards; any batch size, process count, stage, student):

  python -m tinyclip_jax.cache_teacher --config=configs/vit39m.py --augmentations=4 \
      --out=gs://bucket/cache --config.teacher.checkpoint=/ckpt/openai-vit-b-16 \
      --config.data.train=... [--config.data.crop_scale_min=0.35]

walks the shards once and stores, with every sample, the teacher's embeddings of K
crops drawn from its key and of its caption (data/sample_cache.py has the layout and
the rules); runs read them with --config.teacher.cache=PATH and never run the teacher.

Per step (without --augmentations; the only kind for data.kind=synthetic):

  python -m tinyclip_jax.cache_teacher --config=configs/vit39m.py --out=gs://bucket/cache \
      --config.teacher.checkpoint=/ckpt/openai-vit-b-16 --config.data.train=...

reads the same config as the run (teacher, data and its seed, batch size, mesh,
precision) and walks the same input pipeline for `--steps` (default total_steps)
steps, so the run that later sets --config.teacher.cache=PATH sees the very same
batches and crops and reads their teacher embeddings instead of computing them
(see tinyclip_jax/data/teacher_cache.py for the format and the checks). Multi-host
like training: the same command on every host, each writing its own rows.
"""
from __future__ import annotations

import json
import posixpath
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tinyclip_jax import cli, distributed, faults, parallel

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
  flags.DEFINE_integer("augmentations", 0, "K >= 1: a per-sample cache of K crops per image "
                       "(webdataset/tfrecord shards); 0: the per-step cache of one run.")
  flags.DEFINE_integer("batch", 256, "Per-sample cache: images per teacher forward.")
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
  _check_out_folder(out)
  if storage.listdir(out):
    raise prepare.SetupError(f"--out {out} exists and is not empty; give a new folder.")
  with config.unlocked():
    config.teacher.cache = ""
    config.masks.enabled = False  # the student does not matter here
  setup, _ = prepare.build(config, restoring=True)
  if setup.teacher_config is None:
    raise prepare.SetupError("the config has no teacher (teacher.model, .checkpoint and "
                             ".custom are empty); there is nothing to cache.")
  if setup.member_configs:
    raise prepare.SetupError("the per-step cache holds one teacher's embeddings; cache an "
                             "ensemble per sample with --augmentations=K (webdataset or "
                             "tfrecord shards).")
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


def build_samples(config, out: str, k: int, dtype: str = "bfloat16", batch: int = 256) -> dict:
  """Writes a per-sample cache (data/sample_cache.py) of K crops per sample; returns its
  manifest. Each process embeds every process_count-th shard on its own devices (no
  collectives: shards differ in length), then process 0 writes the manifest."""
  from tinyclip_jax import paths, storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import (  # pylint: disable=import-outside-toplevel
      pipeline, sample_build, sample_cache, shards)
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  config, out = paths.resolve_config(config), paths.resolve(out)
  if k < 1:
    raise prepare.SetupError(f"--augmentations={k}: a per-sample cache stores K >= 1 crops "
                             "of each image; give --augmentations=1 or more.")
  if dtype not in ("bfloat16", "float32") or batch < 1:
    raise prepare.SetupError(f"--dtype {dtype!r} / --batch {batch}: use bfloat16 or float32, "
                             "and a positive batch.")
  _check_out_folder(out)
  if config.data.kind not in sample_cache.KINDS:
    raise prepare.SetupError(
        f"--augmentations needs webdataset or tfrecord shards (data.kind), not "
        f"{config.data.kind!r}: samples are found by their keys; write the data as shards "
        "(python -m tinyclip_jax.data.make_shards) or build the per-step cache without "
        "--augmentations.")
  with config.unlocked():
    config.teacher.cache = ""
    config.masks.enabled = False  # the student does not matter here
    config.data.augmentations = k
  try:
    pipeline.check(config.data)
  except ValueError as e:
    raise prepare.SetupError(str(e)) from e
  units = shards.resolve(config.data.train)
  names = [sample_cache.sidecar_name(u) for u in units]
  if len(set(names)) != len(names):
    dup = [u for u, n in zip(units, names) if names.count(n) > 1][:2]
    raise prepare.SetupError(f"data.train has two shards named "
                             f"{posixpath.basename(dup[0].rstrip('/'))!r} ({dup[0]} and "
                             f"{dup[1]}); the cache finds a shard's embeddings by its file "
                             "name, so give shards distinct names.")
  setup, _ = prepare.build(config, restoring=True)
  if setup.teacher_config is None:
    raise prepare.SetupError("the config has no teacher (teacher.model, .checkpoint and "
                             ".custom are empty); there is nothing to cache.")
  members = _members(config, setup)
  cfg = setup.student_config
  manifest = {"format": sample_cache.FORMAT, "kind": config.data.kind, "dtype": dtype,
              "augment": sample_cache.augmentation(config.data, cfg.vision.image_size, k),
              "context_length": cfg.text.context_length,
              "teachers": [dict(t, embed_dim=m[1].embed_dim) for t, m in
                           zip(sample_cache.teachers_entry(
                               [(n, c, h, s) for n, c, h, _, s in members]), members)]}
  done = _start(out, manifest)
  forward = _Forward(members, setup.policy, config.scan_layers, batch, k)
  forward.compile(cfg.vision.image_size, cfg.text.context_length)
  mine = units[jax.process_index()::jax.process_count()]
  counts, t0, images = {}, time.time(), 0
  for i, shard in enumerate(mine):
    name = sample_cache.sidecar_name(shard)
    if name in done:
      counts[name.split("/")[-1][:-len(".safetensors")]] = done[name]
      continue
    # Chunk by chunk: the crops of a chunk are embedded and dropped (a shard's crops at
    # 224 px would not fit in memory), its embeddings kept until the sidecar is written.
    hashes, ok, boxes, parts = [], [], [], []
    for rows in sample_build.shard_rows(shard, config.data, k, cfg.vision.image_size,
                                        chunk=max(1, forward.batch // k)):
      parts.append(forward(rows, cfg.text.context_length))
      hashes += [r.key_hash for r in rows]
      ok += [r.ok for r in rows]
      boxes += [r.boxes for r in rows]
    n = len(members)
    embeds = ([np.concatenate([p[0][m] for p in parts]) if parts else
               np.zeros((0, k, members[m][1].embed_dim), np.float32) for m in range(n)],
              [np.concatenate([p[1][m] for p in parts]) if parts else
               np.zeros((0, members[m][1].embed_dim), np.float32) for m in range(n)])
    sample_cache.write_sidecar(out, shard, np.array(hashes, np.int64), np.array(ok, np.uint8),
                               np.stack(boxes) if boxes else np.zeros((0, k, 4), np.int32),
                               *embeds, dtype)
    n_ok = int(sum(ok))
    counts[posixpath.basename(shard)] = {"records": len(ok), "cached": n_ok}
    images += n_ok * k
    logging.info("cached shard %d/%d %s: %d samples (%.1f images/s)", i + 1, len(mine),
                 posixpath.basename(shard), n_ok, images / max(time.time() - t0, 1e-9))
  storage.write_json(storage.join(out, "parts", f"p{jax.process_index():05d}.json"),
                     {"shards": counts, "images": images, "seconds": time.time() - t0})
  parallel.barrier("sample_cache")
  if jax.process_index() == 0:
    parts = [storage.read_json(storage.join(out, "parts", f"p{p:05d}.json"))
             for p in range(jax.process_count())]
    manifest["shards"] = {n: c for p in parts for n, c in sorted(p["shards"].items())}
    seconds = max(p["seconds"] for p in parts)
    manifest["build"] = {"images": sum(p["images"] for p in parts), "seconds": seconds,
                         "images_per_s": sum(p["images"] for p in parts) / max(seconds, 1e-9)}
    faults.in_write("teacher_cache")
    storage.write_json(storage.join(out, sample_cache.MANIFEST), manifest, sort_keys=True)
  parallel.barrier("sample_cache_done")
  logging.info("wrote the per-sample teacher cache (K=%d) to %s", k, out)
  return storage.read_json(storage.join(out, sample_cache.MANIFEST))


def _check_out_folder(out: str) -> None:
  """--out naming a file (listdir sees an empty folder there) is refused before any work."""
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  if storage.exists(out) and not storage.isdir(out):
    raise prepare.SetupError(f"--out {out} is a file, not a folder; give a new folder.")


def _members(config, setup) -> list:
  """[(name, model config, host weights, device weights, τ)] of the teacher(s), the
  primary first (train/teacher.py)."""
  from tinyclip_jax.train import defaults, teacher  # pylint: disable=import-outside-toplevel
  params = setup.teacher_params if setup.member_configs else (setup.teacher_params,)
  names = [teacher.PRIMARY] + defaults.ensemble_names(config)
  return [(name, cfg, parallel.host_gather(p), None, scale) for name, cfg, p, scale in
          zip(names, setup.teacher_configs, params, setup.loss.teacher_scales)]


def _start(out: str, manifest: dict) -> dict:
  """Starts or resumes a build in `out`: {sidecar name: counts} of the shards an
  interrupted build of the same cache already wrote. A folder holding anything else
  is refused."""
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import sample_cache, teacher_cache  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  plan = storage.join(out, "build.json")
  if storage.listdir(out):
    if storage.exists(storage.join(out, sample_cache.MANIFEST)):
      raise prepare.SetupError(f"--out {out} already holds a complete teacher cache; give a "
                               "new folder.")
    if not storage.exists(plan):
      raise prepare.SetupError(f"--out {out} exists and is not an unfinished build of this "
                               "cache; give a new folder.")
    started = storage.read_json(plan)
    diff = teacher_cache.first_difference(json.loads(json.dumps(manifest)), started)
    if diff:  # say what differs, so a mistyped flag is found and the build resumed
      raise prepare.SetupError(f"--out {out} holds an unfinished build of another cache: "
                               f"{diff.replace('(cache:', '(started with:')}; rerun with its "
                               "settings to resume it, or give a new folder.")
    done = {}
    for name in storage.listdir(storage.join(out, sample_cache.SIDECARS)):
      if name.endswith(".safetensors"):
        done[f"{sample_cache.SIDECARS}/{name}"] = sample_cache.sidecar_counts(
            storage.join(out, sample_cache.SIDECARS, name))
    logging.info("resuming the cache build in %s: %d shard(s) already written", out, len(done))
    return done
  storage.makedirs(out)
  storage.check_writable(out)
  parallel.barrier("sample_cache_start")
  if jax.process_index() == 0:
    storage.write_json(plan, manifest, sort_keys=True)
  return {}


class _Forward:
  """Each teacher's normalized embeddings of rows' crops and captions, in fixed-size
  batches on this process's own devices (replicated weights, rows split)."""

  def __init__(self, members, policy, scan_layers: bool, batch: int, k: int):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
    from tinyclip_jax.models import CLIP, l2_normalize, variables  # pylint: disable=import-outside-toplevel
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("rows",))
    self.rows, self.whole = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
    self.batch = -(-batch // len(devices)) * len(devices)
    self.k = k
    self.towers = []
    for _, cfg, host, _, _ in members:
      model = CLIP(cfg, scan_layers=scan_layers, **policy.teacher_kw)
      params = jax.device_put(host, self.whole)
      image = jax.jit(lambda p, x, m=model: l2_normalize(
          m.apply(variables(p), x, method=CLIP.encode_image)))
      text = jax.jit(lambda p, t, m=model: l2_normalize(
          m.apply(variables(p), t, method=CLIP.encode_text)))
      self.towers.append((params, image, text, cfg.embed_dim))

  def compile(self, image_size: int, context_length: int) -> None:
    """Compiles every tower before the timed build (its images/s is the work's)."""
    for params, image, text, width in self.towers:
      self._run(image, params, np.zeros((1, image_size, image_size, 3), np.float32), width)
      self._run(text, params, np.zeros((1, context_length), np.int32), width)

  def _run(self, fn, params, x: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(x), width), np.float32)
    for a in range(0, len(x), self.batch):
      part = x[a:a + self.batch]
      pad = np.zeros((self.batch - len(part), *x.shape[1:]), x.dtype)
      y = fn(params, jax.device_put(np.concatenate([part, pad]), self.rows))
      out[a:a + len(part)] = np.asarray(y, np.float32)[:len(part)]
    return out

  def __call__(self, rows, context_length: int):
    """([image embeds (N, K, E_m)], [text embeds (N, E_m)]); rows not ok stay zero."""
    from tinyclip_jax import tokenizer  # pylint: disable=import-outside-toplevel
    ok = [i for i, r in enumerate(rows) if r.ok]
    crops = (np.concatenate([rows[i].crops for i in ok]) if ok else None)
    tokens = tokenizer.tokenize([rows[i].caption for i in ok], context_length) if ok else None
    images, texts = [], []
    for params, image, text, width in self.towers:
      img = np.zeros((len(rows), self.k, width), np.float32)
      txt = np.zeros((len(rows), width), np.float32)
      if ok:
        img[ok] = self._run(image, params, crops, width).reshape(len(ok), self.k, width)
        txt[ok] = self._run(text, params, tokens, width)
      images.append(img)
      texts.append(txt)
    return images, texts


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}.", file=sys.stderr)
    return 2
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize(FLAGS)
    if FLAGS.augmentations:
      build_samples(FLAGS.config, FLAGS.out, FLAGS.augmentations, FLAGS.dtype, FLAGS.batch)
    elif FLAGS["augmentations"].present:
      raise prepare.SetupError("--augmentations=0: a per-sample cache stores K >= 1 crops of "
                               "each image; give --augmentations=1 or more (or leave the flag "
                               "out for the per-step cache).")
    else:
      build(FLAGS.config, FLAGS.out, FLAGS.steps, FLAGS.chunk, FLAGS.dtype)
  except (distributed.DistributedError, prepare.SetupError, storage.StorageError,
          ValueError, OSError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  _define_flags()
  # A bad flag value (--augmentations=x) is one sentence and exit 2, as in the trainer.
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_absl_flags)
