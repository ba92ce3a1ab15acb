"""TinyCLIP's pruned (auto weight inheritance) state dicts ↔ canonical params.

Its key names (`image_encoder_without_ddp.visual.*`, `_logit_scale.logit_scale`,
per-layer widths, pruned-away blocks as gaps, L0 masks) are described and mapped
in `keys`. A masked training checkpoint reads as the full model plus its masks'
log α (`from_tinyclip_with_masks`); pruning it is `inherit.prune`'s job.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import keys, openai, resnet
from tinyclip_jax.convert.common import check_params, flatten, from_canonical


def from_tinyclip_with_masks(state_dict: Mapping[str, Any], activation: str,
                             **facts) -> tuple[dict, Any, dict[str, dict]]:
  """(params, config, {"visual"|"text": {mask kind: log α}}) of a TinyCLIP state dict
  (any layout `from_openai` reads is accepted too; `facts`: its head sizes and
  end-of-text id keywords). A pruned checkpoint has no masks ({}); a masked training
  checkpoint has the full weights and the L0 module's log α, which
  `inherit.prune.prune_deterministic` turns into the model TinyCLIP evaluates."""
  rest, logas = keys.split_masks(state_dict)
  params, config = openai.from_openai(rest, activation, **facts)
  return params, config, logas


def from_tinyclip(state_dict: Mapping[str, Any], activation: str, **facts) -> tuple[dict, Any]:
  """(params, config) of the pruned heterogeneous model in a TinyCLIP state dict;
  refuses masked training checkpoints (see `from_tinyclip_with_masks`)."""
  return openai.from_openai(state_dict, activation, **facts)


def to_tinyclip(params: Mapping[str, Any], config) -> dict[str, np.ndarray]:
  """TinyCLIP's pruned state dict (float32) for any model, per-layer widths included:
  what TinyCLIP's pruned `CLIP(...).state_dict()` holds, exactly (no padding). A
  ResNet image tower has no per-layer widths: its open_clip keys, wrapped."""
  if config.vision.kind == "resnet":
    return {keys.to_tinyclip_key(k): v for k, v in resnet.write(params, config).items()}
  check_params(params, config)
  flat = flatten(params)
  return {
      keys.to_tinyclip_key(key): from_canonical(layout, flat[path])
      for key, path, layout, _ in openai.entries(config)
  }
