"""OpenAI / open_clip / TinyCLIP state dicts ↔ canonical params (pure numpy): the one
dispatch over the OpenAI family's formats.

The key names are those of OpenAI's `clip.model.CLIP` and open_clip's `CLIP`
(`keys`); the image tower is a ViT (`vit`) or OpenAI's modified ResNet (`resnet`),
the text tower is the same in both (`transformer`). TinyCLIP's released checkpoints
wrap the same modules in `_image_encoder`, `_text_encoder` and `_logit_scale` (each
maybe DDP-wrapped), or are pruned models whose gaps `keys` closes.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import keys, resnet, vit
from tinyclip_jax.convert.keys import FORMAT  # noqa: F401 (the family's name, for callers)
from tinyclip_jax.models.config import CLIPConfig


def entries(config: CLIPConfig):
  """(state-dict key, canonical path, layout, head_dim) of every tensor of a model of
  `config`, in OpenAI's names (pruned per-layer widths as they are)."""
  return resnet.entries(config) if config.vision.kind == "resnet" else vit.entries(config)


def from_openai(state_dict: Mapping[str, Any], activation: str,
                vision_head_dim: int | None = None, text_head_dim: int | None = None,
                eot_token_id: int | None = None) -> tuple[dict, CLIPConfig]:
  """(params, config) from an OpenAI/open_clip/TinyCLIP state dict of numpy arrays.

  State dicts do not record the activation ('quick_gelu' for OpenAI's checkpoints,
  'gelu' for most open_clip-trained ones), the head sizes or the end-of-text id; a
  head size or id left None is assumed or refused as `convert.meta` describes.
  """
  if keys.is_tinyclip(state_dict):  # pruned blocks may be missing: close the gaps
    state_dict = keys.tinyclip_to_openai(state_dict)
  sd = keys.normalize_keys(state_dict)
  read = resnet.read if resnet.is_resnet(sd) else vit.read  # OpenAI's RN50/RN101…, or a ViT
  return read(sd, activation, vision_head_dim, text_head_dim, eot_token_id)


def to_open_clip(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
  """open_clip `CLIP(...).state_dict()` for a model of `config` (float32 arrays;
  ResNet BatchNorm counters int64); pruned transformer towers are zero-padded to
  uniform widths (exact, logged)."""
  write = resnet.write if config.vision.kind == "resnet" else vit.write
  return write(params, config)
