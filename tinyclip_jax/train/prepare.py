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
import numpy as np
import optax
from absl import logging

from tinyclip_jax import parallel
from tinyclip_jax.inherit import manual
from tinyclip_jax.models import CLIPConfig, ConfigError, init_params, param_shapes, split_stats
from tinyclip_jax.models.clip import logical_axes
from tinyclip_jax.train import defaults, state as state_lib
from tinyclip_jax.train.step import uses_batch_norm

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INITS = ("inherit", "scratch", "checkpoint")


class SetupError(ValueError):
  """A config, checkpoint or mesh problem the user must fix."""


@dataclasses.dataclass
class Setup:
  mesh: Any
  dtype: Any
  student_config: CLIPConfig
  teacher_config: CLIPConfig | None
  teacher_params: Any            # on device, sharded; None without a teacher
  param_shardings: Any
  teacher_shardings: Any
  tx: optax.GradientTransformation
  lr_fn: Any
  state_shardings: Any
  abstract_state: Any


def validate(config: ml_collections.ConfigDict) -> None:
  """Field-level checks that need no devices or files."""
  if config.precision not in PRECISIONS:
    raise SetupError(f"precision {config.precision!r} is unknown; use 'float32' or 'bfloat16'.")
  if config.student.init not in INITS:
    raise SetupError(f"student.init {config.student.init!r} is unknown; use one of {INITS}.")
  for f in ("total_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(config[f]) <= 0:
      raise SetupError(f"{f} must be positive, got {config[f]}.")
  has_teacher = defaults.has_model(config.teacher)
  if not has_teacher and config.loss.alpha != 0:
    raise SetupError("there is no teacher (teacher.model, .checkpoint and .custom are empty) but "
                     "loss.alpha is not 0; set loss.alpha=0 to train with the CLIP loss alone.")
  if config.student.init == "inherit" and not has_teacher:
    raise SetupError("student.init='inherit' needs a teacher; set teacher.model or "
                     "teacher.checkpoint, or use student.init='scratch'.")
  if config.data.kind == "webdataset":
    raise SetupError("data.kind='webdataset' (sharded image-text input) is not built yet; use "
                     "data.kind='synthetic' until the webdataset/TFDS pipeline lands.")
  if config.data.kind != "synthetic":
    raise SetupError(f"data.kind {config.data.kind!r} is unknown; use 'synthetic'.")
  if config.student.init == "checkpoint" and not config.student.checkpoint:
    raise SetupError("student.init='checkpoint' but student.checkpoint is empty; give the "
                     "folder of a flax model checkpoint.")


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
                     ("vocab_size", teacher.text.vocab_size, student.text.vocab_size)):
    if t != s:
      raise SetupError(f"teacher {what} {t} differs from student {what} {s}; teacher and "
                       "student must see the same images and tokens.")


def _shardings(config: CLIPConfig, mesh):
  shapes = param_shapes(config)
  return parallel.fit_shardings(parallel.logical_to_sharding(logical_axes(config), mesh),
                                shapes), shapes


def build(config: ml_collections.ConfigDict, restoring: bool,
          model_configs: tuple[CLIPConfig | None, CLIPConfig] | None = None
          ) -> tuple[Setup, Any]:
  """Returns (setup, initial train state or None when `restoring`).

  `model_configs` (teacher, student) replaces the configs named in `config` (benchmarks
  use it for other image sizes); the teacher then has random weights."""
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
  rng_teacher, rng_student = jax.random.split(jax.random.key(config.seed))

  teacher_cfg = teacher_host = None
  if config.teacher.checkpoint:
    teacher_host, teacher_cfg = _load_checkpoint(config.teacher.checkpoint, "teacher.checkpoint")
  elif defaults.has_model(config.teacher):
    teacher_cfg = _model_config(config.teacher, "teacher")
  if config.student.init == "checkpoint":
    student_host, student_cfg = _load_checkpoint(config.student.checkpoint, "student.checkpoint")
  else:
    student_host, student_cfg = None, _model_config(config.student, "student")
  if model_configs is not None:
    (teacher_cfg, student_cfg), teacher_host = model_configs, None
  if micro and uses_batch_norm(student_cfg):
    raise SetupError(f"microbatch_size {micro} (gradient caching) cannot train a BatchNorm "
                     "(ResNet) student, whose statistics must come from the whole batch; set "
                     "microbatch_size=0.")
  if teacher_cfg is not None:
    _check_compatible(teacher_cfg, student_cfg)
    if config.student.init == "inherit":
      try:  # shape-only dry run: a student wider than its teacher fails here
        jax.eval_shape(lambda p: manual.inherit(p, teacher_cfg, student_cfg),
                       param_shapes(teacher_cfg))
      except manual.InheritError as e:
        raise SetupError(str(e)) from e

  dtype = PRECISIONS[config.precision]
  # Student weights = params + BatchNorm running statistics (ResNets); the state keeps
  # them apart so the optimizer sees the params alone.
  w_shard, w_shapes = _shardings(student_cfg, mesh)
  (s_shard, bs_shard), (s_shapes, bs_shapes) = split_stats(w_shard), split_stats(w_shapes)
  tx = state_lib.make_optimizer(config.optimizer, config.total_steps, config.max_nonfinite + 2)
  lr_fn = state_lib.learning_rate_fn(config.optimizer, config.total_steps)
  abstract = jax.eval_shape(lambda p, b: state_lib.init_state(p, tx, b), s_shapes, bs_shapes)
  repl = parallel.replicated(mesh)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, s_shard,
                                    transform_non_params=lambda _: repl)
  state_shard = state_lib.TrainState(step=repl, params=s_shard, opt_state=opt_shard,
                                     batch_stats=bs_shard)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shard)

  t_params = t_shard = None
  if teacher_cfg is not None:
    t_shard, _ = _shardings(teacher_cfg, mesh)
    if teacher_host is None:  # a zoo teacher with random weights (smoke runs, benchmarks)
      logging.warning("the teacher has random weights (teacher.checkpoint is empty); for a "
                      "real distillation convert one and pass --config.teacher.checkpoint=DIR")
      t_params = jax.jit(lambda r: init_params(teacher_cfg, r), out_shardings=t_shard)(rng_teacher)
    else:
      t_params = jax.device_put(teacher_host, t_shard)

  setup = Setup(mesh, dtype, student_cfg, teacher_cfg, t_params, s_shard, t_shard, tx, lr_fn,
                state_shard, abstract)
  if restoring:
    return setup, None

  if config.student.init == "scratch":
    params = jax.jit(lambda r: init_params(student_cfg, r), out_shardings=w_shard)(rng_student)
  elif config.student.init == "inherit":
    params = jax.jit(lambda p: manual.inherit(p, teacher_cfg, student_cfg),
                     out_shardings=w_shard)(t_params)
  else:
    params = jax.device_put(student_host, w_shard)
  params, batch_stats = split_stats(params)
  if config.loss.learn_scale:  # a learned τ_s starts at student_scale
    params = dict(params, logit_scale=jax.device_put(
        jnp.log(jnp.float32(config.loss.student_scale)), s_shard["logit_scale"]))
  state = jax.jit(lambda p, b: state_lib.init_state(p, tx, b),
                  out_shardings=state_shard)(params, batch_stats)
  return setup, state


def batch_abstract(config, student_cfg: CLIPConfig, mesh) -> dict:
  b, s, n = config.batch_size, student_cfg.vision.image_size, student_cfg.text.context_length
  return {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32,
                                         sharding=parallel.batch_sharding(mesh, 4)),
          "tokens": jax.ShapeDtypeStruct((b, n), jnp.int32,
                                         sharding=parallel.batch_sharding(mesh, 2))}


def model_flops_per_pair(student: CLIPConfig, teacher: CLIPConfig | None) -> float:
  """Training FLOPs per image–text pair: 6·N·tokens for the student (fwd+bwd),
  2·N·tokens for the teacher forward (matmul params only; attention ignored)."""
  def tower(cfg, tokens):
    w = cfg.width
    per_layer = [4 * h * cfg.head_dim * w + 2 * m * w for h, m in zip(cfg.heads, cfg.mlp)]
    return sum(per_layer) * tokens
  def model(cfg):
    return tower(cfg.vision, cfg.vision.grid ** 2 + 1) + tower(cfg.text, cfg.text.context_length)
  return 6.0 * model(student) + (2.0 * model(teacher) if teacher else 0.0)


def as_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
