"""TinyCLIP distillation losses (affinity mimicking + CLIP contrastive loss).

The teacher may be an ensemble (a list of teachers' embeddings, each with its own
logit scale): the affinity targets are then the mean of the teachers' softmax
distributions, per direction (MobileCLIP's rule). Every target is a B×B affinity, so
teachers of different embedding widths mix; the embedding term (an MSE against one
teacher's embeddings) is refused with more than one teacher.

Inputs are L2-normalized embeddings of each device's LOCAL rows. Under an axis
name (inside shard_map) every device all-gathers the global batch and builds
only its own B_local x B affinity rows; no device materializes B x B. The
global loss is the pmean of local means (local batch sizes are equal). The
all-gather transposes to a reduce-scatter, so student gradients are exact.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

AxisName = Union[str, tuple[str, ...], None]
Embeds = dict[str, jax.Array]
Teachers = Union[Embeds, Sequence[Embeds], None]
EMBED_KEYS = ("image_embeds", "text_embeds")

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # older jax
  from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights. total = alpha*w*affinity + (1-alpha)*w*clip + extras.

  The optional extra terms use only their own weight (not w).
  """
  alpha: float = 1.0          # share of affinity mimicking vs. the hard CLIP loss
  distill_weight: float = 1.0  # w
  image_image: float = 0.0    # image-to-image affinity mimicking
  text_text: float = 0.0      # text-to-text affinity mimicking
  embedding: float = 0.0      # MSE-style feature distillation

  @classmethod
  def from_config(cls, section) -> "LossConfig":
    """The weights of a config's `loss` section (its other fields are the step's)."""
    return cls(**{f.name: float(section[f.name]) for f in dataclasses.fields(cls)})

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
    for f in ("distill_weight", "image_image", "text_text", "embedding"):
      if getattr(self, f) < 0:
        raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  # Softmax in at least float32 (bf16 inputs), keep float64 if given.
  return jnp.result_type(x, jnp.float32)


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _affinity(scale: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """scale * rows @ cols.T with float32+ accumulation; B_local x B."""
  dt = _compute_dtype(rows)
  # HIGHEST: logits are scaled by ~50, so bf16-pass matmuls would visibly
  # perturb the loss; the matmul is tiny next to the towers.
  logits = jnp.einsum("id,jd->ij", rows, cols, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=dt)
  return scale.astype(dt) * logits


def _targets(teacher_logits: Sequence[jax.Array]) -> jax.Array:
  """The mean over teachers of softmax(logits) per row. One teacher's softmax is
  returned as is (no sum or division), so a one-teacher list equals today's loss bit
  for bit."""
  p = [jax.nn.softmax(t, axis=-1) for t in teacher_logits]
  if len(p) == 1:
    return p[0]
  return sum(p[1:], p[0]) / len(p)


def _soft_ce(student_logits: jax.Array, teacher_logits: Sequence[jax.Array]) -> jax.Array:
  """Mean over rows of -sum_j p_ij * log_softmax(student)_ij, p the teachers' mean
  softmax (_targets)."""
  p_t = _targets(teacher_logits)
  return -jnp.mean(jnp.sum(p_t * jax.nn.log_softmax(student_logits, axis=-1), axis=-1))


def _hard_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _local_labels(n_local: int, axis_name: AxisName) -> jax.Array:
  # Global column index of local row r on device k is k * B_local + r.
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
  return offset + jnp.arange(n_local)


def as_teachers(teacher: Teachers) -> list[Embeds]:
  """The teachers as a list (one dict: a list of one; None: empty)."""
  if teacher is None:
    return []
  if isinstance(teacher, dict):
    return [teacher]
  teachers = list(teacher)
  if not teachers:
    raise ValueError("the teacher ensemble is empty; pass None for no teacher")
  return teachers


def distill_loss(student: Embeds, teacher: Teachers, cfg: LossConfig,
                 axis_name: AxisName = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TinyCLIP distillation loss over the global batch.

  student / teacher: {"image_embeds": [B_local, D] (L2-normalized),
  "text_embeds": [B_local, D], "logit_scale": scalar tau (not its log)}; `teacher`
  may be a list of such dicts (an ensemble, widths may differ): the soft targets are
  the mean of the teachers' softmax distributions.
  axis_name: None for single-device; else the mesh axis name(s) the batch is
  split over, and this must run inside shard_map.
  Returns (total, terms); terms holds every enabled term (global means) and
  "total".
  """
  extras = {"image_image": cfg.image_image, "text_text": cfg.text_text,
            "embedding": cfg.embedding}
  teachers = as_teachers(teacher)
  if not teachers:
    on = [k for k, v in extras.items() if v] + (["alpha"] if cfg.alpha else [])
    if on:
      raise ValueError(f"teacher is None: only the CLIP loss is allowed (needs alpha=0 "
                       f"and no teacher terms), but {on} are nonzero (alpha={cfg.alpha})")
  else:
    teachers = jax.lax.stop_gradient(teachers)  # the teachers are constants
    if cfg.embedding and len(teachers) > 1:
      raise ValueError(f"embedding distillation needs one teacher, got {len(teachers)}; set "
                       "embedding=0 for an ensemble")
    if cfg.embedding:
      for k in ("image_embeds", "text_embeds"):
        ds, dt = student[k].shape[-1], teachers[0][k].shape[-1]
        if ds != dt:
          raise ValueError(f"embedding distillation needs equal dims: student {k} has "
                           f"dim {ds}, teacher has dim {dt}")

  img_s, txt_s = student["image_embeds"], student["text_embeds"]
  tau_s = jnp.asarray(student["logit_scale"])
  all_img_s, all_txt_s = _gather(img_s, axis_name), _gather(txt_s, axis_name)
  terms: dict[str, jax.Array] = {}

  def teacher_logits(rows: str, cols: str, gathered: dict | None = None) -> list[jax.Array]:
    """Each teacher's local rows × its global columns (`gathered`, or gathered here), at
    its own scale."""
    return [_affinity(jnp.asarray(t["logit_scale"]), t[rows],
                      gathered[cols][i] if gathered else _gather(t[cols], axis_name))
            for i, t in enumerate(teachers)]

  if teachers and (cfg.alpha or cfg.image_image or cfg.text_text):
    if cfg.alpha:
      # (gathered before the affinities: one teacher's program is what it always was)
      cols = {k: [_gather(t[k], axis_name) for t in teachers] for k in EMBED_KEYS}
      terms["affinity_i2t"] = _soft_ce(_affinity(tau_s, img_s, all_txt_s),
                                       teacher_logits("image_embeds", "text_embeds", cols))
      terms["affinity_t2i"] = _soft_ce(_affinity(tau_s, txt_s, all_img_s),
                                       teacher_logits("text_embeds", "image_embeds", cols))
      terms["affinity"] = 0.5 * (terms["affinity_i2t"] + terms["affinity_t2i"])
    if cfg.image_image:
      terms["image_image"] = _soft_ce(_affinity(tau_s, img_s, all_img_s),
                                      teacher_logits("image_embeds", "image_embeds"))
    if cfg.text_text:
      terms["text_text"] = _soft_ce(_affinity(tau_s, txt_s, all_txt_s),
                                    teacher_logits("text_embeds", "text_embeds"))

  if cfg.alpha != 1.0:  # hard loss only when it carries weight
    labels = _local_labels(img_s.shape[0], axis_name)
    terms["clip"] = 0.5 * (_hard_ce(_affinity(tau_s, img_s, all_txt_s), labels)
                           + _hard_ce(_affinity(tau_s, txt_s, all_img_s), labels))

  if teachers and cfg.embedding:
    def sq(s, t):
      dt_ = _compute_dtype(s)
      return jnp.mean(jnp.sum((s.astype(dt_) - t.astype(dt_)) ** 2, axis=-1))
    terms["embedding"] = 0.5 * (sq(img_s, teachers[0]["image_embeds"])
                                + sq(txt_s, teachers[0]["text_embeds"]))

  if axis_name is not None and terms:
    # One all-reduce for all terms: global mean = mean of equal-sized local means.
    names = list(terms)
    reduced = jax.lax.pmean(jnp.stack([terms[n] for n in names]), axis_name)
    terms = {n: reduced[i] for i, n in enumerate(names)}

  w = cfg.distill_weight
  total = jnp.zeros((), _compute_dtype(img_s))
  if "affinity" in terms:
    total = total + cfg.alpha * w * terms["affinity"]
  if "clip" in terms:
    total = total + (1.0 - cfg.alpha) * w * terms["clip"]
  for k, v in extras.items():
    if k in terms:
      total = total + v * terms[k]
  terms["total"] = total
  return total, terms


def sharded_distill_loss(mesh: Mesh, batch_axes: str | Sequence[str], cfg: LossConfig
                         ) -> Callable[[Embeds, Teachers], tuple[jax.Array, dict]]:
  """Wrap distill_loss in shard_map: embeddings split over batch_axes, scales replicated.

  The returned fn takes global arrays (student, teacher dict, list of teacher dicts,
  or None) and returns the replicated (loss, terms).
  """
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)

  def specs(d: Embeds) -> dict:
    return {k: (P() if k == "logit_scale" else P(axes)) for k in d}

  def fn(student: Embeds, teacher: Teachers):
    if teacher is not None and not isinstance(teacher, dict):  # an ensemble: specs per member
      teacher = list(teacher)
      body = lambda s, t: distill_loss(s, t, cfg, axes)
      return _shard_map(body, mesh=mesh, in_specs=(specs(student), [specs(t) for t in teacher]),
                        out_specs=P())(student, teacher)
    if teacher is None:
      body = lambda s: distill_loss(s, None, cfg, axes)
      return _shard_map(body, mesh=mesh, in_specs=(specs(student),),
                        out_specs=P())(student)
    body = lambda s, t: distill_loss(s, t, cfg, axes)
    return _shard_map(body, mesh=mesh, in_specs=(specs(student), specs(teacher)),
                      out_specs=P())(student, teacher)

  return fn
