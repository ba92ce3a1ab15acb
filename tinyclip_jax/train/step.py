"""The pure train step: teacher forward (frozen), student forward/backward,
affinity-mimicking loss on all-gathered embeddings, optimizer update.

A teacher ensemble (config.teacher.ensemble) is a tuple of CLIP modules with a tuple
of their params (the primary teacher first, then the members by name); its cached
embeddings come as tuples of arrays in that order. The loss averages the teachers'
softmax targets (losses.py), each at its own scale (LossSettings.teacher_scales).
One teacher keeps a single module and plain arrays: its programs are unchanged.

With `microbatch_size` the gradient is computed by gradient caching, exactly: the
loss depends on the student's parameters only through the batch's embeddings (and
the logit scale), so (1) embed the whole batch microbatch by microbatch keeping no
activations, (2) take the loss and its gradient w.r.t. those embeddings, (3) run each
microbatch forward again under `jax.vjp` with its slice of that gradient and sum the
parameter gradients. Cost: one extra student forward per step.

BatchNorm (ResNet students) normalizes with the statistics of the batch the jitted
step is given: the global batch, sharded over the mesh, so XLA inserts the
cross-device reductions and the result is synchronized batch norm. The running
statistics come back from the forward pass and enter the new state; a step the
optimizer skips as non-finite keeps the old ones. Gradient caching refuses
BatchNorm students: statistics of microbatches are not the global batch's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyclip_jax import losses
from tinyclip_jax.inherit import masks as masks_lib
from tinyclip_jax.models import CLIP, variables
from tinyclip_jax.parallel import BATCH_AXES
from tinyclip_jax.train.state import TrainState, nonfinite_counts

EMBEDS = ("image_embeds", "text_embeds")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The config's `loss` section, typed once (prepare.setup): the terms' weights and
  the temperatures τ_t (fixed) and τ_s (fixed, or learned and clamped at max_scale)."""
  weights: losses.LossConfig
  teacher_scale: float
  student_scale: float
  learn_scale: bool
  max_scale: float
  member_scales: tuple[float, ...] = ()  # τ of the ensemble's members, by name

  @classmethod
  def from_config(cls, section, ensemble=None) -> "LossSettings":
    """From the `loss` section; `ensemble` (config.teacher.ensemble) adds its members'
    scales."""
    members = tuple(float(ensemble[n].scale) for n in sorted(ensemble or {}))
    return cls(losses.LossConfig.from_config(section), float(section.teacher_scale),
               float(section.student_scale), bool(section.learn_scale),
               float(section.max_scale), members)

  @property
  def teacher_scales(self) -> tuple[float, ...]:
    """τ of every teacher: the primary's, then the members'."""
    return (self.teacher_scale, *self.member_scales)


def student_scale(params, loss_cfg: LossSettings) -> jax.Array:
  """τ_s: fixed, or exp(logit_scale) clamped at max_scale when learned."""
  if loss_cfg.learn_scale:
    return jnp.minimum(jnp.exp(params["logit_scale"].astype(jnp.float32)), loss_cfg.max_scale)
  return jnp.asarray(loss_cfg.student_scale, jnp.float32)


def _embeds(model: CLIP, params, batch, gates=None) -> tuple[jax.Array, jax.Array]:
  """Evaluation-mode embeddings (BatchNorm on running statistics merged into params)."""
  out = model.apply(variables(params), batch["images"], batch["tokens"], gates=gates)
  return out["image_embeds"], out["text_embeds"]


def _train_embeds(model: CLIP, params, batch_stats, batch, gates=None):
  """(embeddings, new batch_stats) in training mode: BatchNorm on the batch's statistics."""
  if batch_stats is None:
    return _embeds(model, params, batch, gates), None
  out, new = model.apply({"params": params, "batch_stats": batch_stats}, batch["images"],
                         batch["tokens"], train=True, gates=gates, mutable=["batch_stats"])
  return (out["image_embeds"], out["text_embeds"]), new["batch_stats"]


def uses_batch_norm(config) -> bool:
  return config.vision.kind == "resnet"


class _Microbatches:
  """Views a global batch (B, ...) as (K, n·m, ...): step k holds the k-th m rows of
  each of the n data-parallel shards, so every device keeps working on its own rows
  (the reshapes move no data between devices)."""

  def __init__(self, mesh, batch_size: int, microbatch_size: int):
    self.mesh = mesh
    self.n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    self.m = microbatch_size
    self.k = batch_size // (self.n * self.m)

  def _constrain(self, x, lead: int):
    spec = P(*([None] * lead), BATCH_AXES, *([None] * (x.ndim - lead - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def split(self, x):
    x = x.reshape(self.n, self.k, self.m, *x.shape[1:]).swapaxes(0, 1)
    return self._constrain(x.reshape(self.k, self.n * self.m, *x.shape[3:]), 1)

  def merge(self, x):
    x = x.reshape(self.k, self.n, self.m, *x.shape[2:]).swapaxes(0, 1)
    return self._constrain(x.reshape(self.k * self.n * self.m, *x.shape[3:]), 0)


def _ensemble_embeds(teacher: tuple[CLIP, ...], teacher_params, batch) -> list:
  """[(image, text) embeddings] of every teacher of an ensemble, in member order."""
  return [_embeds(m, p, batch) for m, p in zip(teacher, teacher_params)]


def make_grad_fn(student: CLIP, teacher: CLIP | tuple[CLIP, ...] | None, loss_cfg: LossSettings,
                 mesh, batch_size: int, microbatch_size: int = 0):
  """Returns grad_fn(trainable, teacher_params, batch, gates_of=None, batch_stats=None)
  -> ((loss, terms), grads).

  `trainable` is the student's params, or with `gates_of` a pair (params, log α of
  the structure masks) and gates_of(log α) the gates the student runs with; the
  gradient is then taken w.r.t. both. With batch_stats (a BatchNorm student)
  terms["batch_stats"] holds the new running statistics. `teacher`: one CLIP, a
  tuple of them (an ensemble: teacher_params is then the tuple of their params), or
  None (no teacher, or its embeddings come with the batch)."""
  loss_fn = losses.sharded_distill_loss(mesh, BATCH_AXES, loss_cfg.weights)

  def unpack(trainable, gates_of):
    """(student params, gates or None) of what the gradient is taken of."""
    return (trainable, None) if gates_of is None else (trainable[0], gates_of(trainable[1]))

  def loss_of(embeds, trainable, t_out, gates_of):
    params = trainable if gates_of is None else trainable[0]
    s_out = dict(zip(EMBEDS, embeds), logit_scale=student_scale(params, loss_cfg))
    return loss_fn(s_out, t_out)

  def student_embeds(trainable, chunk, gates_of):
    params, gates = unpack(trainable, gates_of)
    return _embeds(student, params, chunk, gates)

  ensemble = isinstance(teacher, (tuple, list))

  def forward(teacher_params, batch):
    """One teacher's (image, text) embeddings, or a list of them for an ensemble."""
    if ensemble:
      return _ensemble_embeds(teacher, teacher_params, batch)
    return _embeds(teacher, teacher_params, batch)

  def teacher_embeds(teacher_params, batch):
    """The teacher's normalized embeddings: from the cache (teacher.cache: arrays, or
    tuples of arrays for an ensemble), or a forward pass."""
    if "teacher_image" in batch:
      image, text = batch["teacher_image"], batch["teacher_text"]
      if isinstance(image, (tuple, list)):
        return list(zip(image, text))
      return image, text
    return forward(teacher_params, batch) if teacher else None

  def teacher_out(t_embeds):
    if t_embeds is None:
      return None
    if isinstance(t_embeds, list):  # an ensemble: one dict per teacher at its own τ
      scales = loss_cfg.teacher_scales
      if len(scales) != len(t_embeds):
        raise ValueError(f"the batch holds the embeddings of {len(t_embeds)} teachers but the "
                         f"loss has the scales of {len(scales)}")
      return jax.lax.stop_gradient([dict(zip(EMBEDS, e), logit_scale=jnp.asarray(
          tau, jnp.float32)) for e, tau in zip(t_embeds, scales)])
    return jax.lax.stop_gradient(dict(zip(EMBEDS, t_embeds), logit_scale=jnp.asarray(
        loss_cfg.teacher_scale, jnp.float32)))

  def one_shot(trainable, teacher_params, batch, gates_of=None, batch_stats=None):
    t_out = teacher_out(teacher_embeds(teacher_params, batch))

    def loss(tr):
      params, gates = unpack(tr, gates_of)
      embeds, new_stats = _train_embeds(student, params, batch_stats, batch, gates)
      value, terms = loss_of(embeds, tr, t_out, gates_of)
      return value, (terms if new_stats is None else dict(terms, batch_stats=new_stats))
    return jax.value_and_grad(loss, has_aux=True)(trainable)

  if not microbatch_size:
    return one_shot
  if uses_batch_norm(student.config):
    raise ValueError("microbatch_size > 0 (gradient caching) cannot train a BatchNorm (ResNet) "
                     "student, whose statistics must come from the whole batch; set "
                     "microbatch_size=0.")
  mb = _Microbatches(mesh, batch_size, microbatch_size)

  def cached(trainable, teacher_params, batch, gates_of=None, batch_stats=None):
    del batch_stats  # None: BatchNorm students are refused above
    cached_t = teacher_embeds(None, batch) if "teacher_image" in batch else None
    batch = {k: batch[k] for k in ("images", "tokens")}
    chunks = jax.tree.map(mb.split, batch)
    run_teacher = teacher is not None and cached_t is None

    def embed_chunk(_, chunk):  # (1) forward only: nothing is kept for a backward pass
      s = student_embeds(trainable, chunk, gates_of)
      t = forward(teacher_params, chunk) if run_teacher else None
      return None, (s, t)
    _, (s_chunks, t_chunks) = jax.lax.scan(embed_chunk, None, chunks)
    s_embeds = tuple(mb.merge(e) for e in s_chunks)
    t_out = teacher_out(cached_t if cached_t is not None else
                        jax.tree.map(mb.merge, t_chunks) if run_teacher else None)

    # (2) the loss on the whole batch and its gradient w.r.t. the embeddings
    (loss, terms), (g_embeds, grads) = jax.value_and_grad(
        loss_of, argnums=(0, 1), has_aux=True)(s_embeds, trainable, t_out, gates_of)
    g_chunks = tuple(mb.split(g) for g in g_embeds)

    def backprop_chunk(acc, xs):  # (3) re-run each chunk under vjp with its cotangent
      chunk, g = xs
      _, vjp = jax.vjp(lambda tr: student_embeds(tr, chunk, gates_of), trainable)
      return jax.tree.map(jnp.add, acc, vjp(g)[0]), None
    grads, _ = jax.lax.scan(backprop_chunk, grads, (chunks, g_chunks))
    return (loss, terms), grads

  return cached


def make_train_step(student: CLIP, teacher: CLIP | tuple[CLIP, ...] | None,
                    loss_cfg: LossSettings, mesh, tx,
                    lr_fn: Callable[[Any], Any], batch_size: int = 0, microbatch_size: int = 0,
                    sparsity=None):
  """Returns step(state, teacher_params, batch) -> (state, metrics).

  `sparsity` (a MaskTraining) makes it the masked step of automatic weight
  inheritance: the student runs with hard-concrete gates sampled once per step,
  and the Lagrangian sparsity term trains log α (descent) and λ (ascent)."""
  grad_fn = make_grad_fn(student, teacher, loss_cfg, mesh, batch_size, microbatch_size)

  def step(state: TrainState, teacher_params, batch):
    extra, new_masks, mask_opt_state = {}, state.masks, state.mask_opt_state
    if sparsity is None:
      (loss, terms), grads = grad_fn(state.params, teacher_params, batch,
                                     batch_stats=state.batch_stats)
    else:
      logas, lambdas = state.masks["logas"], state.masks["lambdas"]
      noise = masks_lib.uniform_noise(jax.random.fold_in(sparsity.rng, state.step), logas)
      gates_of = lambda l: masks_lib.training_gates(l, sparsity.valid, noise)  # noqa: E731
      (loss, terms), (grads, g_logas) = grad_fn((state.params, logas), teacher_params, batch,
                                                gates_of, state.batch_stats)
      (lag, extra), (g_lag, g_lambdas) = jax.value_and_grad(
          sparsity.terms, argnums=(0, 1), has_aux=True)(logas, lambdas, state.step)
      g_masks = {"logas": jax.tree.map(jnp.add, g_logas, g_lag), "lambdas": g_lambdas}
      updates, mask_opt_state = sparsity.tx.update(g_masks, state.mask_opt_state, state.masks)
      new_masks = optax.apply_updates(state.masks, updates)
      new_masks = dict(new_masks, logas=masks_lib.clamp(new_masks["logas"]))
      extra = dict(extra, distill_loss=loss)
      loss = loss + lag
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = state.batch_stats
    if batch_stats is not None:  # keep the old statistics when the update was skipped
      batch_stats = jax.tree.map(lambda new, old: jnp.where(opt_state.last_finite, new, old),
                                 terms.pop("batch_stats"), batch_stats)
    consecutive, total = nonfinite_counts(opt_state)
    metrics = dict(terms, **extra, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=lr_fn(state.step),
                   student_scale=student_scale(state.params, loss_cfg),
                   teacher_scale=jnp.asarray(loss_cfg.teacher_scale, jnp.float32),
                   nonfinite_in_a_row=consecutive, nonfinite_total=total)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         masks=new_masks, mask_opt_state=mask_opt_state,
                         batch_stats=batch_stats), metrics

  return step
