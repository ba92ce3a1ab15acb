"""Learnable structure masks for automatic weight inheritance (TinyCLIP / CoFi L0).

Each masked tower has hard-concrete gates with log-α parameters over some of:

  hidden        (W,)          residual-stream dims, shared by every layer
  heads         (L, H_max)    attention heads of each layer
  intermediate  (L, M_max)    MLP hidden units of each layer
  mha, ffn      (L,)          whole attention / whole MLP sub-layers ("layer" kind)

Layers may differ in width (a model pruned by an earlier stage): rows are padded to
the widest layer and `valid` marks the real entries; padded gates are always 0 and
never counted. Everything here is a pure function of arrays, usable under jit.

Formulas and constants are the reference's (DESIGN.md §4): γ=-0.1, ζ=1.1, β=2/3,
ε=1e-6, log α initialised to 10 and clamped to [log 1e-2, log 1e2], deterministic
gates σ(log α / β · 0.8) with the expected number of zeros set to zero.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyclip_jax.models.config import CLIPConfig, TowerConfig

LIMIT_A, LIMIT_B, EPSILON = -0.1, 1.1, 1e-6  # γ, ζ, ε
TEMPERATURE = 2.0 / 3.0  # β
MAGICAL_NUMBER = 0.8  # deterministic-gate sharpening (Wang et al. 2020)
INIT_LOGA = 10.0  # all gates open
LOGA_MIN, LOGA_MAX = math.log(1e-2), math.log(1e2)
INIT_LAMBDA = 10.0

KINDS = ("hidden", "heads", "intermediate", "layer")
# The logical axis (parallel.RULES) a kind's kept units form in the pruned weights.
KIND_AXES = {"hidden": "embed", "heads": "heads", "intermediate": "mlp"}
TOWERS = {"visual": "vision", "text": "text"}  # param key → CLIPConfig field


class MaskError(ValueError):
  """A mask config that does not fit the model."""


# ----------------------------------------------------------------------------- gates


def cdf_qz(x, loga):
  """CDF at x of the stretched concrete distribution, clamped to [ε, 1-ε]."""
  xn = (x - LIMIT_A) / (LIMIT_B - LIMIT_A)
  logits = math.log(xn) - math.log(1.0 - xn)
  return jnp.clip(jax.nn.sigmoid(logits * TEMPERATURE - loga), EPSILON, 1.0 - EPSILON)


def keep_prob(loga):
  """P(z ≠ 0) = 1 - cdf(0): the expected value of the L0 norm of a gate."""
  return 1.0 - cdf_qz(0.0, loga)


def sample_gates(loga, u):
  """Hard-concrete sample from uniform noise u ∈ (ε, 1-ε), differentiable in log α."""
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log(1.0 - u) + loga) / TEMPERATURE)
  return jnp.clip(s * (LIMIT_B - LIMIT_A) + LIMIT_A, 0.0, 1.0)


def uniform_noise(rng, logas):
  """One u ~ U(ε, 1-ε) per gate, shaped like `logas`."""
  leaves, treedef = jax.tree.flatten(logas)
  keys = jax.random.split(rng, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [
      jax.random.uniform(k, x.shape, jnp.float32, EPSILON, 1.0 - EPSILON)
      for k, x in zip(keys, leaves)
  ])


def round_kept(kept, size, multiple: int):
  """`kept` units to the nearest multiple of `multiple` (ties up), a nonzero count
  never down to 0 and at most the largest multiple ≤ `size`; unchanged where even
  one multiple exceeds `size` (such a dim cannot be sharded anyway)."""
  if multiple <= 1:
    return kept
  top = (size // multiple) * multiple
  near = jnp.floor(kept / multiple + 0.5) * multiple
  near = jnp.minimum(jnp.where((near == 0) & (kept > 0), multiple, near), top)
  return jnp.where(top == 0, kept, near)


def _deterministic_rows(loga, valid, multiple: int = 1):
  """Per row: σ(log α/β·0.8), with round(size - Σ P(z≠0)) smallest entries set to 0
  — fewer or more so the kept count is a multiple of `multiple` (round_kept).

  `round` is half-to-even in both Python (the reference) and jnp."""
  soft = jax.nn.sigmoid(loga / TEMPERATURE * MAGICAL_NUMBER)
  size = valid.sum(-1, keepdims=True)
  expected = jnp.where(valid, keep_prob(loga), 0.0).sum(-1, keepdims=True)
  num_zeros = size - round_kept(size - jnp.round(size - expected), size, multiple)
  # Rank the valid entries by score (invalid ones rank last and are zeroed anyway).
  rank = jnp.argsort(jnp.argsort(jnp.where(valid, soft, jnp.inf), axis=-1), axis=-1)
  return jnp.where(valid & (rank >= num_zeros), soft, 0.0)


def deterministic_gates(logas: Mapping, valid: Mapping,
                        multiples: Mapping[str, int] | None = None) -> dict:
  """Evaluation gates for every tower: rows per layer for heads/intermediate, one
  vector for hidden, and each layer's mha/ffn gate on its own (size 1).

  `multiples` {kind: m}: the kept count of each row of that kind is rounded to a
  multiple of m (round_kept) by opening or closing the gates next in score order, so
  the highest-scoring units are the ones kept (masks.round_to)."""
  out = {}
  for tower, kinds in logas.items():
    out[tower] = {}
    for kind, loga in kinds.items():
      v = valid[tower][kind]
      if kind in ("mha", "ffn"):
        z = _deterministic_rows(loga[:, None], v[:, None])[:, 0]
      else:
        z = _deterministic_rows(loga, v, int((multiples or {}).get(kind, 1)))
      out[tower][kind] = z
  return out


def training_gates(logas: Mapping, valid: Mapping, noise: Mapping) -> dict:
  return jax.tree.map(lambda l, v, u: jnp.where(v, sample_gates(l, u), 0.0), logas, valid, noise)


def clamp(logas):
  return jax.tree.map(lambda l: jnp.clip(l, LOGA_MIN, LOGA_MAX), logas)


# ----------------------------------------------------------------------------- layout


def _padded(sizes: Sequence[int]) -> np.ndarray:
  width = max(list(sizes) + [1])
  return np.arange(width)[None, :] < np.asarray(sizes)[:, None]


def tower_valid(cfg: TowerConfig, kinds: Sequence[str]) -> dict[str, np.ndarray]:
  """Which gates exist, per mask kind, for a tower of (possibly uneven) layer widths."""
  valid = {}
  if "hidden" in kinds:
    valid["hidden"] = np.ones((cfg.width,), bool)
  if "heads" in kinds:
    valid["heads"] = _padded(cfg.heads)
  if "intermediate" in kinds:
    valid["intermediate"] = _padded(cfg.mlp)
  if "layer" in kinds:
    valid["mha"] = np.asarray(cfg.heads) > 0
    valid["ffn"] = np.asarray(cfg.mlp) > 0
  return valid


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
  kinds = tuple(kinds)
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise MaskError(f"masks.kinds {kinds} must be a non-empty subset of {KINDS}.")
  return kinds


def model_valid(config: CLIPConfig, towers: Sequence[str], kinds: Sequence[str]) -> dict:
  if getattr(config.vision, "kind", "vit") != "vit":
    raise MaskError(f"structure masks need transformer towers, but this student's image tower "
                    f"is a {config.vision.kind}; use manual inheritance (masks.enabled=False).")
  out = {}
  for tower in towers:
    if tower not in TOWERS:
      raise MaskError(f"masks.towers names {tower!r}, a tower this model does not have; "
                      f"use any of {tuple(TOWERS)}.")
    out[tower] = tower_valid(getattr(config, TOWERS[tower]), check_kinds(kinds))
  return out


def init_logas(valid: Mapping) -> dict:
  """log α = 10 everywhere (all gates open), as the reference."""
  return jax.tree.map(lambda v: jnp.full(v.shape, INIT_LOGA, jnp.float32), valid)


def init_lambdas(towers: Sequence[str]) -> dict:
  return {t: jnp.full((2,), INIT_LAMBDA, jnp.float32) for t in towers}


# ----------------------------------------------------------------------------- accounting


def params_per_head(cfg: TowerConfig) -> int:
  """(4d² + 4d) / H of the reference = 4·head_dim·(d + 1) per head."""
  return 4 * cfg.head_dim * (cfg.width + 1)


def params_per_mlp_unit(cfg: TowerConfig) -> int:
  """(2dI + d + I) // I of the reference with I = 4d, i.e. 2d + 1."""
  return 2 * cfg.width + 1


def prunable_params(cfg: TowerConfig) -> int:
  """Attention and MLP parameters, norms ignored (the reference's prunable size)."""
  d = cfg.width
  heads = sum(cfg.heads) * params_per_head(cfg)
  mlp = sum(2 * d * m + d + m for m in cfg.mlp if m)
  return heads + mlp


def expected_params(logas: Mapping, valid: Mapping, cfg: TowerConfig):
  """Expected remaining prunable parameters of one tower from P(z ≠ 0).

  Without a hidden mask: Σ heads·mha · pph + Σ units·ffn · (2d+1). With one, each
  (hidden dim, head) pair counts pph/d and each (hidden dim, unit) pair 2."""
  score = {k: jnp.where(valid[k], keep_prob(logas[k]), 0.0) for k in logas}
  heads = score.get("heads", jnp.asarray(_padded(cfg.heads), jnp.float32))
  units = score.get("intermediate", jnp.asarray(_padded(cfg.mlp), jnp.float32))
  if "mha" in score:
    heads = heads * score["mha"][:, None]
    units = units * score["ffn"][:, None]
  if "hidden" in score:
    kept = score["hidden"].sum()
    return kept * (heads.sum() * params_per_head(cfg) / cfg.width + units.sum() * 2.0)
  return heads.sum() * params_per_head(cfg) + units.sum() * params_per_mlp_unit(cfg)


def target_sparsity(step, start: float, target: float, warmup: int):
  """Linear ramp from `start` to `target` over `warmup` steps."""
  if warmup <= 0:
    return jnp.asarray(target, jnp.float32)
  frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)
  return start + (target - start) * frac


def lagrangian(expected_sparsity, target, lambdas):
  """λ₁·max(t - ŝ, 0) + λ₂·max(t - ŝ, 0)²."""
  gap = jnp.maximum(target - expected_sparsity, 0.0)
  return lambdas[0] * gap + lambdas[1] * gap**2


def sparsity_terms(logas, lambdas, valid, config: CLIPConfig, reference: CLIPConfig, step,
                   start: float, target: float, warmup: int, joint: bool):
  """(lagrangian loss, metrics) over the masked towers.

  Sparsity is measured against `reference` (the model the first stage masked, e.g.
  the teacher), so a later stage's targets mean what the first stage's do. Joint:
  one sparsity over all masked towers with the towers' λs averaged (the reference's
  `total_loss_flag`)."""
  t = target_sparsity(step, start, target, warmup)
  metrics, loss = {"target_sparsity": t}, 0.0
  expected, full = {}, {}
  for tower in logas:
    cfg, ref = getattr(config, TOWERS[tower]), getattr(reference, TOWERS[tower])
    expected[tower] = expected_params(logas[tower], valid[tower], cfg)
    full[tower] = prunable_params(ref)
    s = 1.0 - expected[tower] / full[tower]
    metrics[f"{tower}/expected_sparsity"] = s
    metrics[f"{tower}/lambda_1"], metrics[f"{tower}/lambda_2"] = lambdas[tower]
    if not joint:
      term = lagrangian(s, t, lambdas[tower])
      metrics[f"{tower}/lagrangian"] = term
      loss = loss + term
  if joint:
    s = 1.0 - sum(expected.values()) / sum(full.values())
    lam = sum(lambdas[t_] for t_ in logas) / len(logas)
    loss = lagrangian(s, t, lam)
    metrics["expected_sparsity"] = s
  metrics["lagrangian"] = loss
  return loss, metrics
