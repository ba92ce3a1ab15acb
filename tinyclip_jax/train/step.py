"""The pure train step: teacher forward (frozen), student forward/backward,
affinity-mimicking loss on all-gathered embeddings, optimizer update."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tinyclip_jax import losses
from tinyclip_jax.models import CLIP
from tinyclip_jax.parallel import BATCH_AXES
from tinyclip_jax.train.state import TrainState, nonfinite_counts


def student_scale(params, loss_cfg) -> jax.Array:
  """τ_s: fixed, or exp(logit_scale) clamped at max_scale when learned."""
  if loss_cfg.learn_scale:
    return jnp.minimum(jnp.exp(params["logit_scale"].astype(jnp.float32)), loss_cfg.max_scale)
  return jnp.asarray(loss_cfg.student_scale, jnp.float32)


def make_train_step(student: CLIP, teacher: CLIP | None, loss_cfg, mesh, tx,
                    lr_fn: Callable[[Any], Any]):
  """Returns step(state, teacher_params, batch) -> (state, metrics)."""
  weights = losses.LossConfig(alpha=loss_cfg.alpha, distill_weight=loss_cfg.distill_weight,
                              image_image=loss_cfg.image_image, text_text=loss_cfg.text_text,
                              embedding=loss_cfg.embedding)
  loss_fn = losses.sharded_distill_loss(mesh, BATCH_AXES, weights)

  def step(state: TrainState, teacher_params, batch):
    images, tokens = batch["images"], batch["tokens"]
    t_out = None
    if teacher is not None:
      out = teacher.apply({"params": teacher_params}, images, tokens)
      t_out = jax.lax.stop_gradient({
          "image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"],
          "logit_scale": jnp.asarray(loss_cfg.teacher_scale, jnp.float32)})

    def compute(params):
      out = student.apply({"params": params}, images, tokens)
      s_out = {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"],
               "logit_scale": student_scale(params, loss_cfg)}
      return loss_fn(s_out, t_out)

    (loss, terms), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    consecutive, total = nonfinite_counts(opt_state)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=lr_fn(state.step),
                   student_scale=student_scale(state.params, loss_cfg),
                   teacher_scale=jnp.asarray(loss_cfg.teacher_scale, jnp.float32),
                   nonfinite_in_a_row=consecutive, nonfinite_total=total)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
