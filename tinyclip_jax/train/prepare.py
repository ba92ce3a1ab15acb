"""Everything before a phase's first step, one job per function: the student's model
config, the phase's optimizer and shardings (`Setup`), the student's starting weights
and train state. Checks of what the user named are in checks.py, the teacher in
teacher.py; `build` composes them for one phase (tests, benchmarks, the cache tool)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tinyclip_jax import parallel
from tinyclip_jax.data import text_buckets
from tinyclip_jax.inherit import manual
from tinyclip_jax.models import CLIPConfig, init_params, param_shapes, split_stats
from tinyclip_jax.models.precision import Policy, policy_for
from tinyclip_jax.train import checks, masking, state as state_lib, teacher as teacher_lib
from tinyclip_jax.train.checks import SetupError, validate  # noqa: F401 - the public names
from tinyclip_jax.train.step import LossSettings, uses_batch_norm


@dataclasses.dataclass
class Setup:
  mesh: Any
  policy: Policy                 # dtypes of the step (models/precision.py)
  student_config: CLIPConfig
  teacher_config: CLIPConfig | None
  # On device, sharded; None without a teacher or with a cache. With an ensemble the
  # tuple of every teacher's params (and shardings), the primary first.
  teacher_params: Any
  param_shardings: Any
  teacher_shardings: Any
  tx: optax.GradientTransformation
  lr_fn: Any
  state_shardings: Any
  abstract_state: Any
  masking: masking.MaskTraining | None = None   # the masked phase of auto inheritance
  teacher_cache: tuple[str, dict] | None = None  # (path, manifest) with teacher.cache
  text_lengths: tuple[int, ...] = ()  # the text buckets: one compiled step each
  mask_state: Any = None          # initial mask logits / multipliers (masked phase)
  mask_tx: Any = None
  loss: LossSettings | None = None  # config.loss, typed
  member_configs: tuple[CLIPConfig, ...] = ()  # the ensemble's other teachers, by name

  @property
  def teacher_configs(self) -> tuple[CLIPConfig, ...]:
    """Every teacher's model config in member order (the primary first); () for none."""
    return (self.teacher_config, *self.member_configs) if self.teacher_config else ()

  @property
  def dtype(self):
    """The student's compute dtype."""
    return self.policy.compute_dtype


def student_config(config, teacher_cfg: CLIPConfig | None):
  """(host weights or None, model config) of the student `config.student` names."""
  if config.student.init == "checkpoint":
    return checks.load_checkpoint(config.student.checkpoint, "student.checkpoint")
  cfg = checks.model_config(config.student, "student")
  if teacher_cfg is not None and teacher_cfg.text.vocab_size == cfg.text.vocab_size:
    # A student built from sizes reads the teacher's tokens: it pools where the teacher does.
    cfg = cfg.replace(text=dataclasses.replace(cfg.text,
                                               eot_token_id=teacher_cfg.text.eot_token_id))
  return None, cfg


def inherit_source(config, teacher: teacher_lib.Teacher | None, student_cfg: CLIPConfig,
                   teacher_cfg: CLIPConfig | None = None):
  """(weights, model config) a manual-inheritance student is cut from, shape-checked;
  with only `teacher_cfg` (no teacher on device yet) the check alone (weights None)."""
  if config.student.inherit_from:
    weights, cfg = checks.load_checkpoint(config.student.inherit_from, "student.inherit_from")
    checks.compatible(cfg, student_cfg)
  elif teacher is not None:
    weights, cfg = teacher.params, teacher.config
  else:
    weights, cfg = None, teacher_cfg
  try:  # shape-only dry run: a student wider than its source fails here
    jax.eval_shape(lambda p: manual.inherit(p, cfg, student_cfg), param_shapes(cfg))
  except manual.InheritError as e:
    raise SetupError(str(e)) from e
  return weights, cfg


def check(config, teacher_cfg: CLIPConfig | None, student_cfg: CLIPConfig,
          start: str) -> None:
  """Every check of a phase that needs only model configs: before anything compiles."""
  if config.microbatch_size and uses_batch_norm(student_cfg):
    raise SetupError(f"microbatch_size {config.microbatch_size} (gradient caching) cannot train "
                     "a BatchNorm (ResNet) student, whose statistics must come from the whole "
                     "batch; set microbatch_size=0.")
  if teacher_cfg is not None:
    checks.compatible(teacher_cfg, student_cfg)
  try:
    text_buckets.lengths(config.text_buckets, student_cfg.text.context_length)
  except ValueError as e:
    raise SetupError(str(e)) from e
  if start == "inherit":
    inherit_source(config, None, student_cfg, teacher_cfg)


def setup(config, mesh, teacher: teacher_lib.Teacher | None, student_cfg: CLIPConfig,
          masks: bool = False, guard: bool = True) -> Setup:
  """One phase's optimizer, schedule, shardings and abstract train state. `guard`: check
  the student's shardings against silent replication (off where the caller already
  did, e.g. masking.check_pruned at the prune step)."""
  # The checks `check` runs before anything compiles; again here for callers that
  # reach this phase another way (the pruned student, a resumed run).
  check(config, teacher.config if teacher else None, student_cfg, start="")
  lengths = text_buckets.lengths(config.text_buckets, student_cfg.text.context_length)
  mask_training = mask_state = mask_tx = None
  if masks:
    mask_tx = state_lib.make_mask_optimizer(config.masks, config.optimizer)
    try:
      mask_training, mask_state = masking.make(
          config, student_cfg, teacher.config if teacher else student_cfg, mask_tx)
    except ValueError as e:
      raise SetupError(str(e)) from e
  # Both phases of automatic inheritance warm up over the masked phase.
  warmup = config.masks.prune_step if config.masks.enabled else None
  # Student weights = params + BatchNorm running statistics (ResNets); the state keeps
  # them apart so the optimizer sees the params alone.
  w_shard = checks.shardings(student_cfg, mesh, config.mesh if guard else None, "student")
  (s_shard, bs_shard), (s_shapes, bs_shapes) = (split_stats(w_shard),
                                                split_stats(param_shapes(student_cfg)))
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
  cache = teacher.cache if teacher is not None else None
  # With a cache the step never sees the teacher's weights (only inheritance does).
  t_params = teacher.step_params if teacher is not None and not cache else None
  t_shard = teacher.step_shardings if teacher is not None and not cache else None
  members = tuple(m.config for m in teacher.members) if teacher is not None else ()
  policy = policy_for(config.precision, mesh.devices.flat[0].platform)
  return Setup(mesh, policy, student_cfg,
               teacher.config if teacher else None, t_params, w_shard, t_shard, tx, lr_fn,
               state_shard, abstract, mask_training, cache, lengths, mask_state, mask_tx,
               LossSettings.from_config(config.loss, {m.name: m for m in teacher.members}
                                        if teacher is not None else None), members)


def student_params(config, s: Setup, teacher: teacher_lib.Teacher | None, host=None):
  """The student's starting weights on device, as `config.student.init` says; `host`:
  the weights of a student.checkpoint (or of a pruned model)."""
  if host is not None:
    return jax.device_put(host, s.param_shardings)
  if config.student.init == "scratch":
    rng = jax.random.split(jax.random.key(config.seed))[1]  # [0]: a random teacher's
    return jax.jit(lambda r: init_params(s.student_config, r),
                   out_shardings=s.param_shardings)(rng)
  source, source_cfg = inherit_source(config, teacher, s.student_config)
  return jax.jit(lambda p: manual.inherit(p, source_cfg, s.student_config),
                 out_shardings=s.param_shardings)(source)


def init_state(config, s: Setup, params, step: int = 0):
  """A fresh train state (optimizer, masks) around the student's weights."""
  params, batch_stats = split_stats(params)
  if config.loss.learn_scale and step == 0:  # a learned τ_s starts at student_scale
    params = dict(params, logit_scale=jax.device_put(
        jnp.log(jnp.float32(config.loss.student_scale)),
        s.state_shardings.params["logit_scale"]))
  return jax.jit(lambda p, m, b: state_lib.init_state(p, s.tx, m, s.mask_tx, batch_stats=b,
                                                      step=step),
                 out_shardings=s.state_shardings)(params, s.mask_state, batch_stats)


def build(config: ml_collections.ConfigDict, restoring: bool = False,
          model_configs: tuple[CLIPConfig | None, CLIPConfig] | None = None
          ) -> tuple[Setup, Any]:
  """The first phase of `config`: (setup, initial train state, or None when `restoring`).
  `model_configs` (teacher, student) replaces the models named in `config` (benchmarks
  use it for other sizes); the teacher then has random weights."""
  validate(config)
  mesh = checks.mesh(config)
  if model_configs is None:  # every check before the teacher's weights are made
    named = teacher_lib.spec(config)
    members = teacher_lib.member_specs(config, named[0]) if named else ()
    host, student_cfg = student_config(config, named[0] if named else None)
    check(config, named[0] if named else None, student_cfg,
          config.student.init if not restoring else "")
  if model_configs is not None:
    teacher_cfg, student_cfg = model_configs
    teacher, host = None, None
    if teacher_cfg is not None:
      shardings = checks.shardings(teacher_cfg, mesh, config.mesh, "teacher")
      teacher = teacher_lib.Teacher(teacher_cfg, jax.jit(
          lambda r: init_params(teacher_cfg, r), out_shardings=shardings)(
              jax.random.split(jax.random.key(config.seed))[0]), shardings)
  else:
    teacher = teacher_lib.load(config, mesh, named, members)
  s = setup(config, mesh, teacher, student_cfg, masks=config.masks.enabled)
  if restoring:
    return s, None
  return s, init_state(config, s, student_params(config, s, teacher, host))


def model_flops_per_pair(student: CLIPConfig, teacher, text_length: int = 0) -> float:
  """Training FLOPs per image–text pair: 6·N·tokens for the student (fwd+bwd),
  2·N·tokens for the teacher forward (matmul params only; attention ignored), summed
  over an ensemble's teachers (`teacher`: a config, a sequence of them, or None);
  text_length: the tokens the text towers run (the batch's text bucket; 0 = the
  context length)."""
  def tower(cfg, tokens):
    w = cfg.width
    per_layer = [4 * h * cfg.head_dim * w + 2 * m * w for h, m in zip(cfg.heads, cfg.mlp)]
    return sum(per_layer) * tokens
  def model(cfg):
    return (tower(cfg.vision, cfg.vision.grid ** 2 + 1) +
            tower(cfg.text, text_length or cfg.text.context_length))
  teachers = teacher if isinstance(teacher, (tuple, list)) else (teacher,) if teacher else ()
  return 6.0 * model(student) + sum(2.0 * model(t) for t in teachers)


def as_numpy(tree):
  return parallel.host_gather(tree)
