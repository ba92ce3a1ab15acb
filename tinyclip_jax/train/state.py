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
  # Structure masks of automatic weight inheritance, until the prune step:
  # {"logas": {tower: {kind: log α}}, "lambdas": {tower: (λ₁, λ₂)}}, beside (not
  # inside) the model's params, with their own optimizer state.
  masks: Any = None
  mask_opt_state: Any = None
  # BatchNorm running statistics of a ResNet student (flax's batch_stats collection,
  # updated by every step, never by the optimizer); None for BatchNorm-free models.
  batch_stats: Any = None


def learning_rate_fn(opt: ml_collections.ConfigDict, total_steps: int, warmup: int | None = None):
  """Linear warm-up then cosine decay. A masked run passes warmup=prune_step: the
  reference warms up over the whole masked phase and decays from the prune step."""
  warmup = int(opt.warmup_steps) if warmup is None else int(warmup)
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt.end_lr)


def decay_mask(params):
  """Weight decay on ≥2-D tensors only, never on the logit scale."""
  def keep(path, x):
    name = jax.tree_util.keystr(path)
    return x.ndim >= 2 and "logit_scale" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, max_nonfinite: int,
                   warmup: int | None = None):
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_fn(opt, total_steps, warmup), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask),
  )
  return optax.apply_if_finite(tx, max_consecutive_errors=max(int(max_nonfinite), 1))


def make_mask_optimizer(masks_cfg: ml_collections.ConfigDict, opt: ml_collections.ConfigDict):
  """Adam without weight decay on log α (lr masks.lr, 0.02) and on λ with a negative
  rate (masks.lambda_lr, -0.02): gradient ascent on the multipliers."""
  def labels(tree):
    return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in tree.items()}
  kw = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps)
  tx = optax.multi_transform({"logas": optax.adam(masks_cfg.lr, **kw),
                              "lambdas": optax.adam(masks_cfg.lambda_lr, **kw)}, labels)
  return optax.apply_if_finite(tx, max_consecutive_errors=1 << 30)


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) non-finite updates skipped so far."""
  return opt_state.notfinite_count, opt_state.total_notfinite


def init_state(params, tx, masks=None, mask_tx=None, step: int = 0,
               batch_stats=None) -> TrainState:
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                    masks=masks, mask_opt_state=None if masks is None else mask_tx.init(masks),
                    batch_stats=batch_stats)
