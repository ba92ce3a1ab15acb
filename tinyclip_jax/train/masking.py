"""Automatic weight inheritance in the training run: the masked phase's pieces
(gate validity, mask optimizer, Lagrangian) and the prune step that ends it.

The masked phase runs steps 1 … masks.prune_step with hard-concrete gates; at the
prune step the deterministic gates are folded into the weights (inherit/prune.py)
and training goes on with the smaller model, a fresh optimizer and no masks.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from tinyclip_jax import parallel, storage, workdir as workdir_lib
from tinyclip_jax.inherit import masks as masks_lib
from tinyclip_jax.inherit import prune as prune_lib
from tinyclip_jax.models import CLIPConfig, count_params


@dataclasses.dataclass(frozen=True)
class MaskTraining:
  rng: Any  # gate noise of step s: fold_in(rng, s)
  valid: dict  # which gates exist (numpy bools)
  tx: Any  # optax transform of {"logas", "lambdas"}
  terms: Callable  # (logas, lambdas, step) -> (lagrangian, metrics)


def check(config: ml_collections.ConfigDict, error) -> None:
  """Field checks of config.masks; `error` is the exception class to raise."""
  m = config.masks
  if not m.enabled:
    return
  towers = tuple(m.towers)
  unknown = [t for t in towers if t not in masks_lib.TOWERS]
  if unknown or not towers:
    raise error(f"masks.towers {towers} names a tower the model lacks; use a non-empty subset "
                f"of {tuple(masks_lib.TOWERS)}.")
  try:
    masks_lib.check_kinds(m.kinds)
  except masks_lib.MaskError as e:
    raise error(str(e)) from e
  if not 0.0 <= m.start_sparsity < 1.0 or not 0.0 <= m.target_sparsity < 1.0:
    raise error(f"masks.start_sparsity {m.start_sparsity} and masks.target_sparsity "
                f"{m.target_sparsity} must lie in [0, 1).")
  if m.target_sparsity < m.start_sparsity:
    raise error(f"masks.target_sparsity {m.target_sparsity} is below masks.start_sparsity "
                f"{m.start_sparsity}; the sparsity ramps up, so set target >= start.")
  if m.sparsity_warmup < 0:
    raise error(f"masks.sparsity_warmup must be >= 0, got {m.sparsity_warmup}.")
  if m.prune_step < m.sparsity_warmup:
    raise error(f"masks.prune_step {m.prune_step} comes before masks.sparsity_warmup "
                f"{m.sparsity_warmup} ends; prune after the target sparsity is reached.")
  if not 0 < m.prune_step <= config.total_steps:
    raise error(
        f"masks.prune_step {m.prune_step} must be in [1, total_steps={config.total_steps}].")


def make(config: ml_collections.ConfigDict, student: CLIPConfig, reference: CLIPConfig, tx):
  """(MaskTraining, initial mask state) for a student masked against `reference`."""
  m = config.masks
  towers = tuple(m.towers)
  valid = masks_lib.model_valid(student, towers, m.kinds)
  start, target, warmup, joint = (float(m.start_sparsity), float(m.target_sparsity),
                                  int(m.sparsity_warmup), bool(m.joint))

  def terms(logas, lambdas, step):
    return masks_lib.sparsity_terms(logas, lambdas, valid, student, reference, step, start, target,
                                    warmup, joint)

  state = {"logas": masks_lib.init_logas(valid), "lambdas": masks_lib.init_lambdas(towers)}
  rng = jax.random.fold_in(jax.random.key(config.seed), 0x6d61736b)  # "mask"
  return MaskTraining(rng, valid, tx, terms), state


def prune_state(params, student: CLIPConfig, mask_state, training: MaskTraining):
  """Host-side prune with the deterministic gates → (params, config, gates)."""
  logas = parallel.host_gather(mask_state["logas"])
  gates = jax.tree.map(np.asarray, masks_lib.deterministic_gates(logas, training.valid))
  host = parallel.host_gather(params)
  pruned, cfg = prune_lib.prune(host, student, gates)
  logging.info("pruned the student: %d → %d params; vision %s, text %s", count_params(host),
               count_params(pruned), _describe(cfg.vision), _describe(cfg.text))
  return pruned, cfg, gates


def _describe(t) -> str:
  return f"width {t.width}, heads {list(t.heads)}, mlp {list(t.mlp)}"


def write_structure(workdir: str,
                    step: int,
                    config: CLIPConfig,
                    tag: str,
                    gates=None,
                    params: int | None = None) -> str:
  """structure/<tag>_<step>.{json,png}: kept width, heads and MLP units per layer of
  each tower (of the model the gates would prune to, when given)."""
  if jax.process_index() != 0:
    return ""
  base = workdir_lib.structure(workdir, tag, step)
  kept = prune_lib.structure(config, gates)
  storage.write_json(base + ".json", {"step": step, "kept": kept, "params": params})
  _plot(base + ".png", config, kept, f"{tag} at step {step}")
  return base


def _plot(path: str, config: CLIPConfig, kept: dict, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
  for row, (tower, field) in enumerate(masks_lib.TOWERS.items()):
    full = getattr(config, field)
    for col, what in enumerate(("heads", "mlp")):
      ax = axes[row][col]
      ax.bar(np.arange(full.layers), getattr(full, what), color="0.85", label="before")
      ax.bar(np.arange(full.layers), kept[tower][what], color="tab:blue", label="kept")
      ax.set_title(
          f"{field}: {'heads' if what == 'heads' else 'MLP width'} per layer "
          f"(width {kept[tower]['width']}/{full.width})",
          fontsize=9)
      ax.set_xlabel("layer")
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80)
  storage.write_bytes(path, buf.getvalue())
  plt.close(fig)
