"""Everything before the first step: validate the config, build the mesh, load the
teacher, initialize (inherit) the student, derive shardings from shapes.

Every user error is raised here as a `SetupError` with one sentence, before any
compilation."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from tinyclip_jax import parallel
from tinyclip_jax.data import pipeline, text_buckets
from tinyclip_jax.eval import tasks as eval_tasks
from tinyclip_jax.inherit import manual
from tinyclip_jax.models import (CLIP, CLIPConfig, ConfigError, init_params, param_shapes,
                                 split_stats)
from tinyclip_jax.models.clip import logical_axes
from tinyclip_jax.models.precision import PRECISIONS, Policy, policy_for
from tinyclip_jax.train import defaults, masking, profiling, state as state_lib
from tinyclip_jax.train.step import uses_batch_norm

INITS = ("inherit", "scratch", "checkpoint")


class SetupError(ValueError):
  """A config, checkpoint or mesh problem the user must fix."""


@dataclasses.dataclass
class Setup:
  mesh: Any
  policy: Policy                 # dtypes of the step (models/precision.py)
  student_config: CLIPConfig
  teacher_config: CLIPConfig | None
  teacher_params: Any            # on device, sharded; None without a teacher
  param_shardings: Any
  teacher_shardings: Any
  tx: optax.GradientTransformation
  lr_fn: Any
  state_shardings: Any
  abstract_state: Any
  masking: masking.MaskTraining | None = None   # the masked phase of auto inheritance
  teacher_cache: tuple[str, dict] | None = None  # (path, manifest) with teacher.cache
  text_lengths: tuple[int, ...] = ()  # the text buckets: one compiled step each

  @property
  def dtype(self):
    """The student's compute dtype."""
    return self.policy.compute_dtype


def validate(config: ml_collections.ConfigDict) -> None:
  """Field-level checks that need no devices or files."""
  if config.precision not in PRECISIONS:
    raise SetupError(f"precision {config.precision!r} is unknown; use 'auto', 'float32' or "
                     "'bfloat16'.")
  if config.student.init not in INITS:
    raise SetupError(f"student.init {config.student.init!r} is unknown; use one of {INITS}.")
  for f in ("total_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(config[f]) <= 0:
      raise SetupError(f"{f} must be positive, got {config[f]}.")
  try:  # the lengths alone here; against the model's context length in `build`
    text_buckets.check(config.text_buckets)
  except ValueError as e:
    raise SetupError(str(e)) from e
  has_teacher = defaults.has_model(config.teacher)
  if not has_teacher and config.loss.alpha != 0:
    raise SetupError("there is no teacher (teacher.model, .checkpoint and .custom are empty) but "
                     "loss.alpha is not 0; set loss.alpha=0 to train with the CLIP loss alone.")
  if config.teacher.cache and not has_teacher:
    raise SetupError("teacher.cache is set but there is no teacher; the cache is checked "
                     "against the teacher it was built from, so set teacher.checkpoint too.")
  if config.student.init == "inherit" and not has_teacher and not config.student.inherit_from:
    raise SetupError("student.init='inherit' needs a teacher; set teacher.model or "
                     "teacher.checkpoint, or use student.init='scratch'.")
  try:  # the input's fields, and its shards or TFDS dataset exist (listed, not read)
    pipeline.check(config.data)
    eval_tasks.task_list(config.eval.tasks)
  except ValueError as e:
    raise SetupError(str(e)) from e
  if config.student.init == "checkpoint" and not config.student.checkpoint:
    raise SetupError("student.init='checkpoint' but student.checkpoint is empty; give the "
                     "folder of a flax model checkpoint.")
  masking.check(config, SetupError)
  profiling.check(config, SetupError)


def _load_checkpoint(path: str, what: str):
  from tinyclip_jax import model_io  # pylint: disable=import-outside-toplevel
  if "://" not in path and not os.path.exists(path):
    raise SetupError(f"{what} {path} does not exist; convert a checkpoint with "
                     "`python -m tinyclip_jax.convert --dst=flax:DIR` and pass DIR.")
  try:
    return model_io.load_model(path)
  except ValueError as e:
    raise SetupError(f"{what} {path} cannot be loaded: {e}") from e


def _model_config(spec, what: str) -> CLIPConfig:
  try:
    return defaults.build_model_config(spec, what)
  except ConfigError as e:
    raise SetupError(str(e)) from e


def _check_compatible(teacher: CLIPConfig, student: CLIPConfig) -> None:
  for what, t, s in (("image_size", teacher.vision.image_size, student.vision.image_size),
                     ("context_length", teacher.text.context_length, student.text.context_length),
                     ("vocab_size", teacher.text.vocab_size, student.text.vocab_size),
                     ("eot_token_id", teacher.text.eot_token_id, student.text.eot_token_id)):
    if t != s:
      raise SetupError(f"teacher {what} {t} differs from student {what} {s}; teacher and "
                       "student must see the same images and tokens.")


def _shardings(config: CLIPConfig, mesh):
  shapes = param_shapes(config)
  return parallel.fit_shardings(parallel.logical_to_sharding(logical_axes(config), mesh),
                                shapes), shapes


@dataclasses.dataclass(frozen=True)
class Pruned:
  """The student after the prune step: its config, and its params unless restoring."""
  config: CLIPConfig
  params: Any = None
  step: int = 0


def build(config: ml_collections.ConfigDict, restoring: bool,
          model_configs: tuple[CLIPConfig | None, CLIPConfig] | None = None,
          pruned: Pruned | None = None, teacher_from: Setup | None = None) -> tuple[Setup, Any]:
  """Returns (setup, initial train state or None when `restoring`).

  `model_configs` (teacher, student) replaces the configs named in `config` (benchmarks
  use it for other image sizes); the teacher then has random weights. With masks on,
  the setup is the masked phase unless `pruned` gives the student after the prune
  step (a fresh optimizer; training continues at pruned.step). `teacher_from`: a
  setup whose teacher (weights on device, cache) is reused instead of loaded again."""
  validate(config)
  try:
    mesh = parallel.make_mesh(config.mesh.to_dict())
  except parallel.MeshError as e:
    raise SetupError(str(e)) from e
  per_step = parallel.batch_size_per_axis(mesh)
  if config.batch_size % per_step:
    raise SetupError(f"batch_size {config.batch_size} is not divisible by the data-parallel "
                     f"size {per_step} (mesh.data × mesh.fsdp); use a multiple of {per_step}.")
  per_device, micro = config.batch_size // per_step, int(config.microbatch_size)
  if micro < 0 or micro > per_device or (micro and per_device % micro):
    raise SetupError(f"microbatch_size {micro} does not divide the per-device batch "
                     f"{per_device} (batch_size {config.batch_size} over {per_step} "
                     "data-parallel devices); use a divisor of it, or 0 for no microbatches.")

  teacher_cfg = teacher_host = None
  if teacher_from is not None:
    teacher_cfg = teacher_from.teacher_config
  elif config.teacher.checkpoint:
    teacher_host, teacher_cfg = _load_checkpoint(config.teacher.checkpoint, "teacher.checkpoint")
  elif defaults.has_model(config.teacher):
    teacher_cfg = _model_config(config.teacher, "teacher")
  if pruned is not None:  # the student is the pruned model, whatever it started from
    student_host, student_cfg = None, pruned.config
  elif config.student.init == "checkpoint":
    student_host, student_cfg = _load_checkpoint(config.student.checkpoint, "student.checkpoint")
  else:
    student_host, student_cfg = None, _model_config(config.student, "student")
    if teacher_cfg is not None and teacher_cfg.text.vocab_size == student_cfg.text.vocab_size:
      # A student built from sizes reads the teacher's tokens: it pools where the teacher does.
      student_cfg = student_cfg.replace(text=dataclasses.replace(
          student_cfg.text, eot_token_id=teacher_cfg.text.eot_token_id))
  if model_configs is not None:
    (teacher_cfg, student_cfg), teacher_host = model_configs, None
  if micro and uses_batch_norm(student_cfg):
    raise SetupError(f"microbatch_size {micro} (gradient caching) cannot train a BatchNorm "
                     "(ResNet) student, whose statistics must come from the whole batch; set "
                     "microbatch_size=0.")

  if teacher_cfg is not None:
    _check_compatible(teacher_cfg, student_cfg)
  try:
    text_lengths = text_buckets.lengths(config.text_buckets, student_cfg.text.context_length)
  except ValueError as e:
    raise SetupError(str(e)) from e
  # After the config checks: splitting the key compiles.
  rng_teacher, rng_student = jax.random.split(jax.random.key(config.seed))
  source_host = source_cfg = None  # what a manual-inheritance student is cut from
  if config.student.init == "inherit" and pruned is None:
    if config.student.inherit_from:
      source_host, source_cfg = _load_checkpoint(config.student.inherit_from,
                                                 "student.inherit_from")
      _check_compatible(source_cfg, student_cfg)
    else:
      source_cfg = teacher_cfg
    try:  # shape-only dry run: a student wider than its source fails here
      jax.eval_shape(lambda p: manual.inherit(p, source_cfg, student_cfg),
                     param_shapes(source_cfg))
    except manual.InheritError as e:
      raise SetupError(str(e)) from e

  mask_training = mask_state = mask_tx = None
  if config.masks.enabled and pruned is None:
    mask_tx = state_lib.make_mask_optimizer(config.masks, config.optimizer)
    try:
      mask_training, mask_state = masking.make(config, student_cfg, teacher_cfg or student_cfg,
                                               mask_tx)
    except ValueError as e:
      raise SetupError(str(e)) from e
  warmup = config.masks.prune_step if config.masks.enabled else None

  policy = policy_for(config.precision, mesh.devices.flat[0].platform)
  # Student weights = params + BatchNorm running statistics (ResNets); the state keeps
  # them apart so the optimizer sees the params alone.
  w_shard, w_shapes = _shardings(student_cfg, mesh)
  (s_shard, bs_shard), (s_shapes, bs_shapes) = split_stats(w_shard), split_stats(w_shapes)
  tx = state_lib.make_optimizer(config.optimizer, config.total_steps, config.max_nonfinite + 2,
                                warmup, model_config=student_cfg)
  lr_fn = state_lib.learning_rate_fn(config.optimizer, config.total_steps, warmup)
  abstract = jax.eval_shape(
      lambda p, m, b: state_lib.init_state(p, tx, m, mask_tx, batch_stats=b), s_shapes,
      mask_state, bs_shapes)
  repl = parallel.replicated(mesh)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, s_shard,
                                    transform_non_params=lambda _: repl)
  state_shard = state_lib.TrainState(
      step=repl, params=s_shard, opt_state=opt_shard,
      masks=jax.tree.map(lambda _: repl, abstract.masks),
      mask_opt_state=jax.tree.map(lambda _: repl, abstract.mask_opt_state),
      batch_stats=bs_shard)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shard)

  t_params = t_shard = cache = None
  if teacher_from is not None:
    t_params, t_shard = teacher_from.teacher_params, teacher_from.teacher_shardings
    cache = teacher_from.teacher_cache
  elif teacher_cfg is not None:
    t_shard, _ = _shardings(teacher_cfg, mesh)
    if teacher_host is None:  # a zoo teacher with random weights (smoke runs, benchmarks)
      logging.warning("the teacher has random weights (teacher.checkpoint is empty); for a "
                      "real distillation convert one and pass --config.teacher.checkpoint=DIR")
      t_params = jax.jit(lambda r: init_params(teacher_cfg, r), out_shardings=t_shard)(rng_teacher)
    else:
      t_params = jax.device_put(teacher_host, t_shard)
    if config.teacher.cache:
      cache = _check_cache(config, teacher_cfg, teacher_host, t_params)
  # With a cache the step never sees the teacher's weights (only inheritance below does).
  setup = Setup(mesh, policy, student_cfg, teacher_cfg, None if cache else t_params, s_shard,
                None if cache else t_shard, tx, lr_fn, state_shard, abstract, mask_training, cache,
                text_lengths)
  if restoring:
    return setup, None

  if pruned is not None:
    state = jax.jit(lambda p: state_lib.init_state(p, tx, step=pruned.step),
                    out_shardings=state_shard)(jax.device_put(pruned.params, s_shard))
    return setup, state
  if config.student.init == "scratch":
    params = jax.jit(lambda r: init_params(student_cfg, r), out_shardings=w_shard)(rng_student)
  elif config.student.init == "inherit":
    source = t_params if source_host is None else source_host
    params = jax.jit(lambda p: manual.inherit(p, source_cfg, student_cfg),
                     out_shardings=w_shard)(source)
  else:
    params = jax.device_put(student_host, w_shard)
  params, batch_stats = split_stats(params)
  if config.loss.learn_scale:  # a learned τ_s starts at student_scale
    params = dict(params, logit_scale=jax.device_put(
        jnp.log(jnp.float32(config.loss.student_scale)), s_shard["logit_scale"]))
  state = jax.jit(lambda p, m, b: state_lib.init_state(p, tx, m, mask_tx, batch_stats=b),
                  out_shardings=state_shard)(params, mask_state, batch_stats)
  return setup, state


def step_models(config, setup: Setup) -> tuple[CLIP, CLIP | None]:
  """(student, teacher or None) as the train step runs them: dtypes and attention from
  the precision policy, remat for the student, scan_layers for both; no teacher when
  its embeddings come from a cache."""
  student = CLIP(setup.student_config, remat=config.remat, scan_layers=config.scan_layers,
                 **setup.policy.student_kw)
  teacher = (CLIP(setup.teacher_config, scan_layers=config.scan_layers,
                  **setup.policy.teacher_kw)
             if setup.teacher_config and not setup.teacher_cache else None)
  return student, teacher


def batch_abstract(config, student_cfg: CLIPConfig, mesh, teacher_embed_dim: int = 0,
                   text_length: int = 0) -> dict:
  """The global batch; with teacher_embed_dim, also the cached teacher embeddings;
  text_length: the tokens' bucket (0 = the context length)."""
  b, s = config.batch_size, student_cfg.vision.image_size
  n = text_length or student_cfg.text.context_length
  out = {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32,
                                        sharding=parallel.batch_sharding(mesh, 4)),
         "tokens": jax.ShapeDtypeStruct((b, n), jnp.int32,
                                        sharding=parallel.batch_sharding(mesh, 2))}
  if teacher_embed_dim:
    for k in ("teacher_image", "teacher_text"):
      out[k] = jax.ShapeDtypeStruct((b, teacher_embed_dim), jnp.float32,
                                    sharding=parallel.batch_sharding(mesh, 2))
  return out


def _check_cache(config, teacher_cfg, teacher_host, t_params) -> tuple[str, dict]:
  """(path, manifest) of a teacher cache built for exactly this teacher and input."""
  from tinyclip_jax.data import teacher_cache  # pylint: disable=import-outside-toplevel
  path = config.teacher.cache
  try:
    manifest = teacher_cache.load_manifest(path)
    weights = teacher_host if teacher_host is not None else parallel.host_gather(t_params)
    expected = teacher_cache.describe(config, teacher_cfg, teacher_cache.teacher_digest(weights))
    teacher_cache.check(manifest, expected, config.total_steps, path)
  except teacher_cache.CacheError as e:
    raise SetupError(str(e)) from e
  logging.info("reading the teacher's embeddings from %s (%d steps cached)", path,
               manifest["steps"])
  return path, manifest


def model_flops_per_pair(student: CLIPConfig, teacher: CLIPConfig | None,
                         text_length: int = 0) -> float:
  """Training FLOPs per image–text pair: 6·N·tokens for the student (fwd+bwd),
  2·N·tokens for the teacher forward (matmul params only; attention ignored);
  text_length: the tokens the text towers run (the batch's text bucket; 0 = the
  context length)."""
  def tower(cfg, tokens):
    w = cfg.width
    per_layer = [4 * h * cfg.head_dim * w + 2 * m * w for h, m in zip(cfg.heads, cfg.mlp)]
    return sum(per_layer) * tokens
  def model(cfg):
    return (tower(cfg.vision, cfg.vision.grid ** 2 + 1) +
            tower(cfg.text, text_length or cfg.text.context_length))
  return 6.0 * model(student) + (2.0 * model(teacher) if teacher else 0.0)


def as_numpy(tree):
  return parallel.host_gather(tree)
