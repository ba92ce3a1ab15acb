"""OpenAI / open_clip CLIP state dicts with a ViT image tower ↔ canonical params
(pure numpy, OpenAI's key names: `keys.normalize_keys` maps the other layouts)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import meta, transformer
from tinyclip_jax.convert.common import (CONV, SAME, CheckpointError, check_params, dims, flatten,
                                         from_canonical, take_entries, tower_layout, unflatten)
from tinyclip_jax.convert.keys import FORMAT
from tinyclip_jax.convert.pad import pad_uniform
from tinyclip_jax.models.config import CLIPConfig, VisionConfig

# (state-dict key, canonical path, layout) of the image tower outside its blocks.
VISION_TOP = (
    ("visual.conv1.weight", "visual/conv1", CONV),
    ("visual.class_embedding", "visual/class_embedding", SAME),
    ("visual.positional_embedding", "visual/positional_embedding", SAME),
    ("visual.ln_pre.weight", "visual/ln_pre/scale", SAME),
    ("visual.ln_pre.bias", "visual/ln_pre/bias", SAME),
    ("visual.ln_post.weight", "visual/ln_post/scale", SAME),
    ("visual.ln_post.bias", "visual/ln_post/bias", SAME),
    ("visual.proj", "visual/proj", SAME),
)
VISION_BLOCKS = "visual.transformer.resblocks."


def check_is_clip_vit(sd: Mapping[str, Any]) -> None:
  """Raises CheckpointError unless a normalized state dict is a CLIP ViT."""
  if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
    return
  found = ", ".join(f"`{k}`" for k in sorted(sd)[:4]) or "no keys at all"
  hint = (" It looks like a Hugging Face CLIPModel: convert it with `from_hf`."
          if any(k.startswith(("vision_model.", "text_model.")) for k in sd) else "")
  raise CheckpointError(f"the checkpoint is not an OpenAI/open_clip CLIP ViT state dict: found "
                        f"{found} but expected `visual.conv1.weight`, "
                        f"`visual.transformer.resblocks.0.*` and `token_embedding.weight`.{hint}")


def infer_config(sd: Mapping[str, Any], activation: str, vision_head_dim: int | None = None,
                 text_head_dim: int | None = None,
                 eot_token_id: int | None = None) -> CLIPConfig:
  """The model config implied by the shapes of a normalized state dict and the facts
  they do not hold (None: the rule of `meta`, 64-channel heads or a refusal)."""
  width, chans, patch, patch_w = dims(sd, "visual.conv1.weight", 4, "patch embedding")
  if chans != 3 or patch != patch_w:
    raise CheckpointError(f"`visual.conv1.weight` has shape {(width, chans, patch, patch_w)} but "
                          "a square patch embedding over 3 channels (W, 3, p, p) was expected.")
  tokens = dims(sd, "visual.positional_embedding", 2, "vision positions")[0]
  grid = math.isqrt(max(tokens - 1, 0))
  if grid * grid + 1 != tokens:
    raise CheckpointError(f"`visual.positional_embedding` has {tokens} rows but a square grid "
                          "plus a class token (g*g+1 rows) was expected.")
  embed_dim = dims(sd, "visual.proj", 2, "image projection")[1]
  v_attn, v_mlp = transformer.block_widths(sd, VISION_BLOCKS)
  v_hd = meta.head_dim("vision", v_attn, vision_head_dim, vit_width=width)
  return CLIPConfig(
      embed_dim=embed_dim, activation=activation,
      vision=VisionConfig(width=width, heads=[a // v_hd for a in v_attn], mlp=v_mlp,
                          head_dim=v_hd, image_size=grid * patch, patch_size=patch),
      text=transformer.text_config(sd, text_head_dim, eot_token_id))


def entries(config: CLIPConfig):
  """(state-dict key, canonical path, layout, head_dim) for every tensor of `config`,
  in the order of OpenAI's state dict: top-level tensors, then the blocks."""
  for key, path, layout in VISION_TOP + transformer.TEXT_TOP:
    yield key, path, layout, 0
  yield from transformer.block_entries("visual", VISION_BLOCKS, config.vision)
  yield from transformer.block_entries("text", transformer.TEXT_BLOCKS, config.text)


def read(sd: Mapping[str, Any], activation: str, vision_head_dim: int | None = None,
         text_head_dim: int | None = None,
         eot_token_id: int | None = None) -> tuple[dict, CLIPConfig]:
  """(params, config) from a normalized CLIP ViT state dict (facts as in `infer_config`)."""
  check_is_clip_vit(sd)
  config = infer_config(sd, activation, vision_head_dim, text_head_dim, eot_token_id)
  flat, extra = take_entries(sd, entries(config))
  if extra:
    raise CheckpointError(f"key `{extra[0]}` (and {len(extra) - 1} more) has no place in a CLIP "
                          "ViT model with plain pre-LN blocks; expected only OpenAI/open_clip "
                          "CLIP keys (no layer scale, no logit_bias, no attention pooling).")
  params = unflatten(flat)
  check_params(params, config)
  return params, config


def write(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
  """open_clip `CLIP(...).state_dict()` of a ViT model (float32 arrays); pruned
  towers are zero-padded to uniform widths (exact, logged)."""
  check_params(params, config)
  params, config = pad_uniform(params, config, FORMAT)
  tower_layout(config.vision, "vision", FORMAT)
  tower_layout(config.text, "text", FORMAT)
  flat = flatten(params)
  return {key: from_canonical(layout, flat[path]) for key, path, layout, _ in entries(config)}
