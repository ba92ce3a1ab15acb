"""Train state and optimizer: the released recipe on optax.

AdamW β=(0.9, 0.98), ε=1e-6, decoupled weight decay 0.2 on matrices only (not
biases, norms, gains, embeddings of size 1-D, or the logit scale), cosine decay after
linear warm-up, global-norm clipping, and `optax.apply_if_finite` so a non-finite
gradient skips the update and is counted.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # BatchNorm running statistics of a ResNet student (flax's batch_stats collection,
  # updated by every step, never by the optimizer); None for BatchNorm-free models.
  batch_stats: Any = None


def learning_rate_fn(opt: ml_collections.ConfigDict, total_steps: int):
  warmup = min(int(opt.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt.end_lr)


def decay_mask(params):
  """Weight decay on ≥2-D tensors only, never on the logit scale."""
  def keep(path, x):
    name = jax.tree_util.keystr(path)
    return x.ndim >= 2 and "logit_scale" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, max_nonfinite: int):
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_fn(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask),
  )
  return optax.apply_if_finite(tx, max_consecutive_errors=max(int(max_nonfinite), 1))


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) non-finite updates skipped so far."""
  return opt_state.notfinite_count, opt_state.total_notfinite


def init_state(params, tx, batch_stats=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    batch_stats=batch_stats)
