"""Checks of what the user named, before anything compiles: the config's fields, the
mesh and batch split, model specs, checkpoint folders, teacher/student compatibility.
Every failure is a `SetupError` with one sentence naming the thing and the fix."""
from __future__ import annotations

import difflib
import os

import ml_collections

from tinyclip_jax import parallel, storage
from tinyclip_jax.data import pipeline, text_buckets
from tinyclip_jax.eval import suite as eval_suite
from tinyclip_jax.models import CLIPConfig, ConfigError, param_shapes
from tinyclip_jax.models.clip import logical_axes
from tinyclip_jax.models.precision import PRECISIONS
from tinyclip_jax.train import defaults, masking, profiling

INITS = ("inherit", "scratch", "checkpoint")


class SetupError(ValueError):
  """A config, checkpoint or mesh problem the user must fix."""


def _unknown_fields(config, base, where: str = "") -> list[tuple[str, list[str]]]:
  """(dotted field, the fields it sits beside) of every field `base` does not have."""
  out = []
  for key, value in config.items():
    if key not in base:
      out.append((where + key, list(base.keys())))
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        base[key], ml_collections.ConfigDict):
      out += _unknown_fields(value, base[key], f"{where}{key}.")
  return out


def check_fields(config: ml_collections.ConfigDict) -> None:
  """A field a config file sets that the defaults do not have is a typo (`c.totl_steps =
  3` would otherwise train the default number of steps without a word)."""
  extra = [(f, near) for f, near in _unknown_fields(config, defaults.base_config())
           # the demo configs' own section; eval.kind: the retired field's own sentence;
           # the ensemble's members are named by the config (checked below)
           if f not in ("demo", "eval.kind") and not f.startswith("teacher.ensemble.")]
  ensemble = config.teacher.get("ensemble") or {}
  for name in sorted(ensemble):
    if not isinstance(ensemble[name], ml_collections.ConfigDict):
      raise SetupError(f"teacher.ensemble.{name} is {ensemble[name]!r}; each member is a model "
                       "section: defaults.ensemble_member(model=..., checkpoint=..., scale=...).")
    full = defaults.ensemble_member()
    missing = [f for f in full.keys() if f not in ensemble[name]]
    if missing:  # a hand-made ConfigDict: the later checks would read a field it lacks
      raise SetupError(f"teacher.ensemble.{name} has no field {missing[0]!r}; make each member "
                       "with defaults.ensemble_member(model=..., checkpoint=..., scale=...).")
    extra += _unknown_fields(ensemble[name], full, f"teacher.ensemble.{name}.")
  if extra:
    field, near = extra[0]
    hint = difflib.get_close_matches(field.rsplit(".", 1)[-1], near, n=1)
    fix = f"did you mean {hint[0]!r}?" if hint else "check the spelling"
    raise SetupError(f"the config sets {field}, which is not a field ({fix}); every field and "
                     "its default is in tinyclip_jax/train/defaults.py.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Field-level checks that need no devices or files."""
  check_fields(config)
  if config.precision not in PRECISIONS:
    raise SetupError(f"precision {config.precision!r} is unknown; use 'auto', 'float32' or "
                     "'bfloat16'.")
  if config.student.init not in INITS:
    raise SetupError(f"student.init {config.student.init!r} is unknown; use one of {INITS}.")
  for f in ("total_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(config[f]) <= 0:
      raise SetupError(f"{f} must be positive, got {config[f]}.")
  try:  # the lengths alone here; against the model's context length at setup
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
  ensemble(config, has_teacher)
  if config.student.init == "inherit" and not has_teacher and not config.student.inherit_from:
    raise SetupError("student.init='inherit' needs a teacher; set teacher.model or "
                     "teacher.checkpoint, or use student.init='scratch'.")
  try:  # the input's fields, and its shards or TFDS dataset exist (listed, not read)
    pipeline.check(config.data)
    tasks = eval_suite.check(config.eval)
  except ValueError as e:
    raise SetupError(str(e)) from e
  for t in tasks:
    if t.startswith("folder:") and not storage.isdir(t[len("folder:"):]):
      raise SetupError(f"eval task {t}: the folder {t[len('folder:'):]} does not exist; give "
                       "a folder of images and labels.json (see the README's Evaluation).")
  if config.student.init == "checkpoint" and not config.student.checkpoint:
    raise SetupError("student.init='checkpoint' but student.checkpoint is empty; give the "
                     "folder of a flax model checkpoint.")
  masking.check(config, SetupError)
  profiling.check(config, SetupError)


def ensemble(config, has_teacher: bool) -> None:
  """The ensemble's config-level rules (its members' models are checked when read)."""
  members = defaults.ensemble_names(config)
  if not members:
    return
  if not has_teacher:
    raise SetupError(f"teacher.ensemble names {members} but there is no primary teacher "
                     "(teacher.model, .checkpoint and .custom are empty); set config.teacher, "
                     "which the student inherits from.")
  if "teacher" in members:  # the primary's name among the members (teacher.all_members)
    raise SetupError("teacher.ensemble.teacher is the primary teacher's name (config.teacher); "
                     "give the member another name.")
  if float(config.loss.embedding):
    raise SetupError(f"loss.embedding needs one teacher: an ensemble of {len(members) + 1} "
                     "teachers has no one embedding to match; set loss.embedding=0 or drop "
                     "teacher.ensemble.")
  for name in members:
    ensemble_member(config.teacher.ensemble[name], f"teacher.ensemble.{name}")


def ensemble_member(member, what: str) -> None:
  """An ensemble member names a model and has a positive logit scale."""
  if not defaults.has_model(member):
    raise SetupError(f"{what} names no model (its model, checkpoint and custom are empty); set "
                     f"{what}.checkpoint to a converted model, {what}.model to a zoo name, or "
                     "drop the member.")
  if not float(member.scale) > 0:
    raise SetupError(f"{what}.scale is {member.scale}; a teacher's logit scale must be "
                     "positive (e.g. 50.0, or 100.0 for an OpenAI CLIP).")


def same_input(primary: CLIPConfig, member: CLIPConfig, what: str) -> None:
  """An ensemble member reads the primary teacher's images and tokens (one input
  pipeline feeds them all)."""
  for field, p, m in (("image_size", primary.vision.image_size, member.vision.image_size),
                      ("context_length", primary.text.context_length,
                       member.text.context_length),
                      ("vocab_size", primary.text.vocab_size, member.text.vocab_size),
                      ("eot_token_id", primary.text.eot_token_id, member.text.eot_token_id)):
    if p != m:
      raise SetupError(f"{what} has {field} {m} but the teacher (config.teacher) has {field} "
                       f"{p}; every teacher of an ensemble must read the same images and "
                       "tokens, so use members with the teacher's image size and tokenizer.")


def workdir(path: str) -> None:
  """A workdir that is (or, locally, lies under) a file cannot hold the run's folders:
  said before anything trains (os.makedirs would fail after the first stage's setup)."""
  if not path:
    return
  if storage.is_url(path):
    if storage.exists(path) and not storage.isdir(path):
      raise SetupError(f"the workdir {path} is a file; give a folder (new or one a run of "
                       "this config wrote).")
    return
  at = os.path.abspath(path)
  while not os.path.exists(at) and os.path.dirname(at) != at:
    at = os.path.dirname(at)
  if not os.path.isdir(at):
    where = "is a file" if at == os.path.abspath(path) else f"lies under {at}, which is a file"
    raise SetupError(f"the workdir {path} {where}; give a folder (new or one a run of this "
                     "config wrote).")


def mesh(config: ml_collections.ConfigDict):
  """The device mesh, with the batch and microbatch split checked against it."""
  try:
    m = parallel.make_mesh(config.mesh.to_dict())
  except parallel.MeshError as e:
    raise SetupError(str(e)) from e
  per_step = parallel.batch_size_per_axis(m)
  if config.batch_size % per_step:
    raise SetupError(f"batch_size {config.batch_size} is not divisible by the data-parallel "
                     f"size {per_step} (mesh.data × mesh.fsdp); use a multiple of {per_step}.")
  per_device, micro = config.batch_size // per_step, int(config.microbatch_size)
  if micro < 0 or micro > per_device or (micro and per_device % micro):
    raise SetupError(f"microbatch_size {micro} does not divide the per-device batch "
                     f"{per_device} (batch_size {config.batch_size} over {per_step} "
                     "data-parallel devices); use a divisor of it, or 0 for no microbatches.")
  return m


def load_checkpoint(path: str, what: str):
  """(host params, model config) of a flax model folder the config names."""
  from tinyclip_jax import model_io  # pylint: disable=import-outside-toplevel
  if "://" not in path and not os.path.exists(path):
    raise SetupError(f"{what} {path} does not exist; convert a checkpoint with "
                     "`python -m tinyclip_jax.convert --dst=flax:DIR` and pass DIR.")
  try:
    return model_io.load_model(path)
  except ValueError as e:
    raise SetupError(f"{what} {path} cannot be loaded: {e}") from e


def model_config(spec, what: str) -> CLIPConfig:
  try:
    return defaults.build_model_config(spec, what)
  except ConfigError as e:
    raise SetupError(str(e)) from e


def compatible(teacher: CLIPConfig, student: CLIPConfig) -> None:
  for what, t, s in (("image_size", teacher.vision.image_size, student.vision.image_size),
                     ("context_length", teacher.text.context_length, student.text.context_length),
                     ("vocab_size", teacher.text.vocab_size, student.text.vocab_size),
                     ("eot_token_id", teacher.text.eot_token_id, student.text.eot_token_id)):
    if t != s:
      raise SetupError(f"teacher {what} {t} differs from student {what} {s}; teacher and "
                       "student must see the same images and tokens.")


def shardings(config: CLIPConfig, mesh, mesh_config=None, what: str = "student"):
  """The parameters' shardings, derived from their logical axes and shapes; with
  `mesh_config` (config.mesh), the guard against silent replication reports (and per
  mesh.replication warns or stops on) what the mesh does not divide."""
  shapes, asked = param_shapes(config), parallel.logical_to_sharding(logical_axes(config), mesh)
  if mesh_config is not None:
    parallel.guard(asked, shapes, mesh, mesh_config, what)  # what fit_shardings replicates
  return parallel.fit_shardings(asked, shapes)
