"""Physical pruning: fold fixed structure gates into the weights and cut out what
they close (automatic weight inheritance's prune step).

A gate value g multiplies a head's, unit's or dim's output in the masked model, so
the pruned model keeps the entries with g ≠ 0 and scales the matrices that read
their outputs by g. LayerNorms over a hidden-dim mask take their statistics over
the kept dims (models/layers.py), which is a LayerNorm of the pruned width, so
their parameters are only gathered. The pruned model therefore equals the masked
model with the same gates (tested to 1e-5). The reference additionally scales the
final projection by the hidden gate, which its masked forward does not do; here
the two agree exactly instead.

Layers whose attention and MLP are both closed are removed. Pure numpy, host side:
the kept sizes decide the output shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from tinyclip_jax.inherit import masks
from tinyclip_jax.inherit.masks import TOWERS
from tinyclip_jax.models.config import CLIPConfig, TowerConfig
from tinyclip_jax.models.params import CheckpointError


def _np(x) -> np.ndarray:
  return np.asarray(x)


def _prune_block(block: Mapping[str, Any], g: Mapping[str, np.ndarray], hidden: np.ndarray,
                 keep: np.ndarray, heads: int, mlp: int):
  """One residual block → (params, heads kept, mlp units kept)."""
  out: dict[str, Any] = {}
  kept_heads = kept_units = 0
  if heads:
    head_z = _np(g["heads"])[:heads] if "heads" in g else np.ones(heads, np.float32)
    layer_z = float(_np(g["mha"])) if "mha" in g else 1.0
    kh = np.flatnonzero(head_z)
    if layer_z != 0 and kh.size:
      a = block["attn"]
      scale_out = (head_z[kh][:, None, None] * hidden[keep][None, None, :] * layer_z)
      out["ln_1"] = {k: _np(v)[keep] for k, v in block["ln_1"].items()}
      out["attn"] = {
          "in_proj_kernel":
              _np(a["in_proj_kernel"])[keep][:, :, kh],
          "in_proj_bias":
              _np(a["in_proj_bias"])[:, kh],
          "out_proj_kernel": (_np(a["out_proj_kernel"])[kh][:, :, keep] * scale_out).astype(
              _np(a["out_proj_kernel"]).dtype),
          "out_proj_bias": (_np(a["out_proj_bias"])[keep] * hidden[keep] * layer_z).astype(
              _np(a["out_proj_bias"]).dtype),
      }
      kept_heads = int(kh.size)
  if mlp:
    unit_z = _np(g["intermediate"])[:mlp] if "intermediate" in g else np.ones(mlp, np.float32)
    layer_z = float(_np(g["ffn"])) if "ffn" in g else 1.0
    ku = np.flatnonzero(unit_z)
    if layer_z != 0 and ku.size:
      fc, proj = block["mlp"]["c_fc"], block["mlp"]["c_proj"]
      w = _np(proj["kernel"])
      out["ln_2"] = {k: _np(v)[keep] for k, v in block["ln_2"].items()}
      out["mlp"] = {
          "c_fc": {
              "kernel": _np(fc["kernel"])[keep][:, ku],
              "bias": _np(fc["bias"])[ku]
          },
          "c_proj": {
              "kernel": (w[ku][:, keep] * unit_z[ku][:, None] * hidden[keep][None, :] *
                         layer_z).astype(w.dtype),
              "bias": (_np(proj["bias"])[keep] * hidden[keep] * layer_z).astype(w.dtype)
          },
      }
      kept_units = int(ku.size)
  return out, kept_heads, kept_units


def _prune_tower(p: Mapping[str, Any], cfg: TowerConfig, g: Mapping[str, np.ndarray],
                 tower: str) -> tuple[dict, TowerConfig]:
  hidden = _np(g["hidden"]).astype(np.float32) if "hidden" in g else np.ones(cfg.width, np.float32)
  keep = hidden != 0
  if not keep.any():
    raise ValueError(f"every hidden dim of the {tower} tower is gated off; lower the target "
                     "sparsity.")
  h = hidden[keep]
  out = {k: v for k, v in p.items() if not k.startswith("layers_")}
  # Embeddings feed the residual stream: times the gate, then gathered.
  if tower == "visual":
    conv = _np(p["conv1"])
    out["conv1"] = (conv[..., keep] * h).astype(conv.dtype)
    for k in ("class_embedding", "positional_embedding"):
      x = _np(p[k])
      out[k] = (x[..., keep] * h).astype(x.dtype)
    norms, proj = ("ln_pre", "ln_post"), "proj"
  else:
    for k in ("token_embedding", "positional_embedding"):
      x = _np(p[k])
      out[k] = (x[..., keep] * h).astype(x.dtype)
    norms, proj = ("ln_final",), "text_projection"
  for k in norms:
    out[k] = {n: _np(v)[keep] for n, v in p[k].items()}
  out[proj] = _np(p[proj])[keep]

  heads, mlp = [], []
  for i, (nh, nm) in enumerate(zip(cfg.heads, cfg.mlp)):
    lg = {k: _np(v)[i] for k, v in g.items() if k != "hidden"}
    block, kh, km = _prune_block(p[f"layers_{i}"], lg, hidden, keep, nh, nm)
    if kh or km:  # a block with neither sub-layer is the identity: drop it
      out[f"layers_{len(heads)}"] = block
      heads.append(kh)
      mlp.append(km)
  new_cfg = dataclasses.replace(cfg, width=int(keep.sum()), heads=tuple(heads), mlp=tuple(mlp))
  return out, new_cfg


def prune(params: Mapping[str, Any], config: CLIPConfig,
          gates: Mapping[str, Mapping[str, Any]]) -> tuple[dict, CLIPConfig]:
  """(pruned params, pruned config) for fixed gates {"visual": {...}, "text": {...}}
  (deterministic_gates of inherit/masks.py); towers without gates are unchanged."""
  out = dict(params)
  changes = {}
  for tower, g in gates.items():
    field = TOWERS[tower]
    out[tower], changes[field] = _prune_tower(params[tower], getattr(config, field), g, tower)
  return out, config.replace(**changes)


def structure(config: CLIPConfig,
              gates: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Kept width, heads and MLP units per layer of each tower — of the model the
  gates would prune to (per original layer, 0 where a sub-layer goes), or of
  `config` itself without gates."""
  out = {}
  for tower, field in TOWERS.items():
    cfg = getattr(config, field)
    g = (gates or {}).get(tower, {})
    heads, mlp = list(cfg.heads), list(cfg.mlp)
    for i in range(cfg.layers):
      if "heads" in g:
        heads[i] = int(np.count_nonzero(_np(g["heads"])[i, :cfg.heads[i]]))
      if "intermediate" in g:
        mlp[i] = int(np.count_nonzero(_np(g["intermediate"])[i, :cfg.mlp[i]]))
      if "mha" in g and float(_np(g["mha"])[i]) == 0:
        heads[i] = 0
      if "ffn" in g and float(_np(g["ffn"])[i]) == 0:
        mlp[i] = 0
    width = int(np.count_nonzero(_np(g["hidden"]))) if "hidden" in g else cfg.width
    out[tower] = {"width": width, "heads": heads, "mlp": mlp}
  return out


def prune_deterministic(params: Mapping[str, Any], config: CLIPConfig,
                        logas: Mapping[str, Mapping[str, Any]]) -> tuple[dict, CLIPConfig]:
  """A masked model → the pruned one, with the reference's deterministic gates (what
  TinyCLIP evaluates a masked training checkpoint as). `logas`: {"visual"|"text":
  {mask kind: log α}}; masks shaped for another model raise CheckpointError."""
  valid = {}
  for tower, kinds in logas.items():
    cfg = getattr(config, TOWERS[tower])
    names = [k for k in ("hidden", "heads", "intermediate") if k in kinds]
    v = masks.tower_valid(cfg, names + (["layer"] if {"mha", "ffn"} & set(kinds) else []))
    valid[tower] = {k: v[k] for k in kinds}
    for k, loga in kinds.items():
      if np.shape(loga) != v[k].shape:
        raise CheckpointError(f"the {tower} `{k}` mask has shape {np.shape(loga)} but the "
                              f"model's {tower} tower needs {v[k].shape}; the masks belong to "
                              "another model.")
  gates = masks.deterministic_gates(logas, valid)
  gates = {t: {k: np.asarray(z) for k, z in g.items()} for t, g in gates.items()}
  return prune(params, config, gates)
