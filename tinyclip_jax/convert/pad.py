"""Zero-padding of pruned (per-layer) towers to the uniform widths that HF's
CLIPModel and open_clip's CLIP build.

Exact: a padded head has zero q/k/v/out weights and biases, so its values are 0
and it adds nothing through out_proj; a padded MLP unit computes act(0) = 0 for
GELU and QuickGELU and has a zero c_proj row; a padded whole sub-layer adds
exactly 0 (its LayerNorm, scale 1 and bias 0, only feeds zero weights).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from absl import logging

from tinyclip_jax.convert.common import CheckpointError, as_f32
from tinyclip_jax.models.config import CLIPConfig

TOWERS = (("vision", "visual"), ("text", "text"))


def exportable(tower) -> bool:
  """True when the tower is already what a uniform PyTorch module builds (a ResNet
  image tower always is: it has no per-layer heads to pad)."""
  if getattr(tower, "kind", "vit") != "vit":
    return True
  return (tower.uniform and tower.layers > 0 and tower.heads[0] > 0 and tower.mlp[0] > 0 and
          tower.heads[0] * tower.head_dim == tower.width)


def _padded_tower(tower, name: str, fmt: str):
  if exportable(tower):
    return tower
  heads = tower.width // tower.head_dim
  if tower.width % tower.head_dim or max(tower.heads, default=0) > heads:
    raise CheckpointError(
        f"the pruned {name} tower has width {tower.width} and per-layer heads "
        f"{list(tower.heads)} of {tower.head_dim} channels, which {fmt} cannot hold exactly "
        f"(it needs heads * {tower.head_dim} == width in every layer); export it with "
        "--dst=tinyclip:PATH (TinyCLIP's pruned layout) or --dst=flax:PATH instead.")
  return dataclasses.replace(
      tower, heads=(heads,) * tower.layers, mlp=(max(max(tower.mlp, default=0), 1),) * tower.layers)


def padded_config(config: CLIPConfig, fmt: str) -> CLIPConfig:
  """`config` with every tower padded to uniform heads (width // head_dim) and MLP
  width (the largest layer's), or CheckpointError when that is not exact."""
  return config.replace(
      vision=_padded_tower(config.vision, "vision", fmt),
      text=_padded_tower(config.text, "text", fmt))


def describe(config: CLIPConfig, padded: CLIPConfig) -> str | None:
  """One sentence naming the padded towers and sizes, or None when nothing was padded."""
  parts = []
  for name, _ in TOWERS:
    old, new = getattr(config, name), getattr(padded, name)
    if old is not new:
      parts.append(f"{name} heads {list(old.heads)} -> {new.heads[0]}, MLP {list(old.mlp)} -> "
                   f"{new.mlp[0]} in all {new.layers} layers")
  if not parts:
    return None
  return ("padded the pruned model with zero weights to uniform widths (exact): " +
          "; ".join(parts) + ".")


def _grow(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """x zero-padded at the end of `axis` to `size`."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad)


def _pad_layer(layer: Mapping[str, Any], width: int, heads: int, mlp: int,
               head_dim: int) -> dict[str, Any]:
  """One block grown to `heads` heads and `mlp` MLP units; a pruned sub-layer starts
  from zero heads / units (and a LayerNorm of scale 1, bias 0)."""
  zeros = lambda *shape: np.zeros(shape, np.float32)
  ln = {"scale": np.ones(width, np.float32), "bias": zeros(width)}
  attn = layer.get("attn") or {"in_proj_kernel": zeros(width, 3, 0, head_dim),
                               "in_proj_bias": zeros(3, 0, head_dim),
                               "out_proj_kernel": zeros(0, head_dim, width),
                               "out_proj_bias": zeros(width)}
  mlp_in = layer.get("mlp") or {"c_fc": {"kernel": zeros(width, 0), "bias": zeros(0)},
                                "c_proj": {"kernel": zeros(0, width), "bias": zeros(width)}}
  fc, proj = mlp_in["c_fc"], mlp_in["c_proj"]
  return {
      "ln_1": layer.get("ln_1", ln),
      "attn": {"in_proj_kernel": _grow(as_f32(attn["in_proj_kernel"]), 2, heads),
               "in_proj_bias": _grow(as_f32(attn["in_proj_bias"]), 1, heads),
               "out_proj_kernel": _grow(as_f32(attn["out_proj_kernel"]), 0, heads),
               "out_proj_bias": attn["out_proj_bias"]},
      "ln_2": layer.get("ln_2", ln),
      "mlp": {"c_fc": {"kernel": _grow(as_f32(fc["kernel"]), 1, mlp),
                       "bias": _grow(as_f32(fc["bias"]), 0, mlp)},
              "c_proj": {"kernel": _grow(as_f32(proj["kernel"]), 0, mlp), "bias": proj["bias"]}},
  }


def pad_uniform(params: Mapping[str, Any], config: CLIPConfig,
                fmt: str) -> tuple[dict[str, Any], CLIPConfig]:
  """(params, config) padded to uniform towers for `fmt`; unchanged when they already
  are. Logs (absl, INFO) which towers were padded and to what sizes."""
  padded = padded_config(config, fmt)
  note = describe(config, padded)
  if note is None:
    return dict(params), config
  out = dict(params)
  for name, key in TOWERS:
    old, new = getattr(config, name), getattr(padded, name)
    if old is new:
      continue
    tower = dict(params[key])
    for i in range(new.layers):
      tower[f"layers_{i}"] = _pad_layer(params[key].get(f"layers_{i}", {}), new.width, new.heads[0],
                                        new.mlp[0], new.head_dim)
    out[key] = tower
  logging.info("%s", note)
  return out, padded


# ----------------------------------------------------------------------------- undoing it

def _cut_layer(layer: Mapping[str, Any], heads: int, mlp: int) -> tuple[dict, list[np.ndarray]]:
  """One padded block cut back to `heads` heads and `mlp` MLP units (0: the sub-layer
  is dropped), and the cut-off tensors whose contribution must be zero."""
  out, gone = {}, []
  attn, fc, proj = layer["attn"], layer["mlp"]["c_fc"], layer["mlp"]["c_proj"]
  if heads:
    out["ln_1"] = layer["ln_1"]
    out["attn"] = {"in_proj_kernel": attn["in_proj_kernel"][:, :, :heads],
                   "in_proj_bias": attn["in_proj_bias"][:, :heads],
                   "out_proj_kernel": attn["out_proj_kernel"][:heads],
                   "out_proj_bias": attn["out_proj_bias"]}
    gone += [attn["in_proj_kernel"][:, :, heads:], attn["in_proj_bias"][:, heads:]]
  else:  # what a padded empty sub-layer adds: its output bias
    gone.append(attn["out_proj_bias"])
  gone.append(attn["out_proj_kernel"][heads:])
  if mlp:
    out["ln_2"] = layer["ln_2"]
    out["mlp"] = {"c_fc": {"kernel": fc["kernel"][:, :mlp], "bias": fc["bias"][:mlp]},
                  "c_proj": {"kernel": proj["kernel"][:mlp], "bias": proj["bias"]}}
    gone += [fc["kernel"][:, mlp:], fc["bias"][mlp:]]
  else:
    gone.append(proj["bias"])
  gone.append(proj["kernel"][mlp:])
  return out, gone


def unpad(params: Mapping[str, Any], config: CLIPConfig,
          pruned: CLIPConfig) -> dict[str, Any] | None:
  """The pruned model `pruned` back out of its zero-padded export (`config` ==
  padded_config(pruned)), or None when the padding is not zero any more (the export
  was changed, e.g. trained further, and is no longer the pruned model exactly)."""
  out = dict(params)
  for name, key in TOWERS:
    old, new = getattr(config, name), getattr(pruned, name)
    if old == new:
      continue
    tower = dict(params[key])
    for i, (heads, mlp) in enumerate(zip(new.heads, new.mlp)):
      tower[f"layers_{i}"], gone = _cut_layer(params[key][f"layers_{i}"], heads, mlp)
      if any(np.any(np.asarray(x) != 0) for x in gone):
        return None
    out[key] = tower
  return out
