"""Train state and optimizer: the released recipe on optax.

AdamW β=(0.9, 0.98), ε=1e-6, decoupled weight decay 0.2 by open_clip's rule (none on
a parameter whose open_clip tensor has fewer than 2 dims or whose open_clip name holds
`bn`, `ln`, `bias` or `logit_scale`: biases, norms, gains, the class embedding, the
logit scale; token and positional embeddings are decayed), cosine decay after linear
warm-up, global-norm clipping, and `optax.apply_if_finite` so a non-finite gradient
skips the update and is counted.
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


# Substrings of an open_clip parameter name that exclude it from weight decay
# (open_clip's training/main.py, which TinyCLIP trains with).
NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale")


def open_clip_decays(name: str, ndim: int) -> bool:
  """open_clip's rule for the parameter `name` of rank `ndim` (its own layout)."""
  return ndim >= 2 and not any(s in name for s in NO_DECAY_NAMES)


def decay_mask(model_config):
  """The optax mask (params → tree of bools) of the params open_clip decays. Each leaf
  is judged by its open_clip name and rank, not by its rank here: the fused
  attention bias is (3, heads, head_dim) here but 1-D in open_clip."""
  from tinyclip_jax.convert.names import open_clip_keys  # pylint: disable=import-outside-toplevel
  keys = open_clip_keys(model_config)
  decided = {}

  def keep(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name not in keys:
      raise ValueError(f"param `{name}` has no open_clip counterpart, so weight decay cannot be "
                       "decided for it; the params do not belong to the model config.")
    shape = tuple(jnp.shape(x))
    if (name, shape) not in decided:
      key, layout = keys[name]
      torch_shape = jax.eval_shape(layout.from_canonical, jax.ShapeDtypeStruct(shape, jnp.float32))
      decided[name, shape] = open_clip_decays(key, len(torch_shape.shape))
    return decided[name, shape]

  return lambda params: jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, max_nonfinite: int,
                   warmup: int | None = None, *, model_config):
  """The chain for the params of a model of `model_config` (its weight-decay mask)."""
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_fn(opt, total_steps, warmup), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask(model_config)),
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
