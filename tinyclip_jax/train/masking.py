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
from tinyclip_jax.models import CLIPConfig, count_params, param_shapes
from tinyclip_jax.models.clip import logical_axes


@dataclasses.dataclass(frozen=True)
class MaskTraining:
  rng: Any  # gate noise of step s: fold_in(rng, s)
  valid: dict  # which gates exist (numpy bools)
  tx: Any  # optax transform of {"logas", "lambdas"}
  terms: Callable  # (logas, lambdas, step) -> (lagrangian, metrics)
  multiples: dict = dataclasses.field(default_factory=dict)  # {kind: m}: masks.round_to


def check(config: ml_collections.ConfigDict, error) -> None:
  """Field checks of config.masks and of the replication guard's fields (mesh.replication,
  mesh.max_replicated_fraction, masks.round_to); `error` is the exception class to raise."""
  m = config.masks
  try:
    parallel.check_policy(config.mesh.get("replication", "warn"),
                          config.mesh.get("max_replicated_fraction",
                                          parallel.MAX_REPLICATED_FRACTION))
  except ValueError as e:
    raise error(str(e)) from e
  if int(m.get("round_to", 0)) < -1:
    raise error(f"masks.round_to {m.round_to} is invalid; use 0 (off), -1 (the size of the mesh "
                "axis each width is sharded over) or a positive multiple.")
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
  return MaskTraining(rng, valid, tx, terms, round_multiples(config)), state


def round_multiples(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{kind: multiple} the prune rounds each masked kind's kept units to (masks.round_to).

  Without rounding on a mesh that shards a masked kind, warns now: the pruned widths
  are only known at the prune step, and any the mesh does not divide are replicated."""
  m, round_to = config.masks, int(config.masks.get("round_to", 0))
  sizes = dict(zip(parallel.MESH_AXES,
                   parallel.mesh_shape(config.mesh.to_dict(), jax.device_count())))
  kinds = [k for k in m.kinds if k in masks_lib.KIND_AXES]
  by_mesh = {k: parallel.axis_size(masks_lib.KIND_AXES[k], sizes) for k in kinds}
  if round_to == 0:
    sharded = [k for k in kinds if by_mesh[k] > 1]
    if sharded:
      logging.warning("the mesh shards the masked %s; their pruned widths are only known at "
                      "masks.prune_step, and any the mesh does not divide will be replicated; "
                      "set masks.round_to=-1 to round them to the mesh.", ", ".join(sharded))
    return {}
  return by_mesh if round_to == -1 else {k: round_to for k in kinds}


def check_pruned(config: ml_collections.ConfigDict, pruned: CLIPConfig, mesh) -> str:
  """The replication guard on the pruned student, at the prune step: before the
  pruned phase compiles (warns, or raises parallel.ReplicationError)."""
  shardings = parallel.logical_to_sharding(logical_axes(pruned), mesh)
  fix = ("set masks.round_to=-1 (the mesh's axis sizes) and resume, so the prune keeps widths "
         "the mesh divides") if not config.masks.get("round_to", 0) else (
             "choose a masks.round_to the mesh axes divide")
  return parallel.guard(shardings, param_shapes(pruned), mesh, config.mesh,
                        "the pruned student", fix)


def prune_state(params, student: CLIPConfig, mask_state, training: MaskTraining):
  """Host-side prune with the deterministic gates → (params, config, gates)."""
  logas = parallel.host_gather(mask_state["logas"])
  gates = jax.tree.map(np.asarray, masks_lib.deterministic_gates(logas, training.valid,
                                                                 training.multiples))
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
