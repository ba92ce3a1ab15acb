"""OpenAI / open_clip / TinyCLIP state dicts ↔ canonical params (pure numpy).

The key names are those of OpenAI's `clip.model.CLIP` and open_clip's `CLIP` with a
ViT image tower. TinyCLIP's released checkpoints wrap the same modules in
`_image_encoder`, `_text_encoder` and `_logit_scale` (each maybe DDP-wrapped).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import meta, tinyclip
from tinyclip_jax.convert.common import (CONV, IN_BIAS, IN_PROJ, LINEAR, OUT_PROJ, SAME, SCALAR,
                                         CheckpointError, check_params, flatten, from_canonical,
                                         layer_indices, require, take_entries, tower_layout,
                                         unflatten)
from tinyclip_jax.convert.pad import pad_uniform
from tinyclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig

FORMAT = "an open_clip/OpenAI state dict"

# Non-tensor entries of OpenAI's TorchScript state dict, and causal-mask buffers.
DROPPED = frozenset({"input_resolution", "context_length", "vocab_size"})

# Leading prefixes of wrapped layouts → OpenAI's top level; the first match wins.
PREFIXES = (
    ("_image_encoder.module.", ""),  # TinyCLIP (DDP-wrapped towers)
    ("_image_encoder.", ""),
    ("_text_encoder.module.", ""),
    ("_text_encoder.", ""),
    ("_logit_scale.module.", ""),
    ("_logit_scale.", ""),
    ("text.", ""),  # open_clip CustomTextCLIP with its builtin text tower
)

# (state-dict key, canonical path, layout) outside the transformer blocks.
TOP = (
    ("visual.conv1.weight", "visual/conv1", CONV),
    ("visual.class_embedding", "visual/class_embedding", SAME),
    ("visual.positional_embedding", "visual/positional_embedding", SAME),
    ("visual.ln_pre.weight", "visual/ln_pre/scale", SAME),
    ("visual.ln_pre.bias", "visual/ln_pre/bias", SAME),
    ("visual.ln_post.weight", "visual/ln_post/scale", SAME),
    ("visual.ln_post.bias", "visual/ln_post/bias", SAME),
    ("visual.proj", "visual/proj", SAME),
    ("token_embedding.weight", "text/token_embedding", SAME),
    ("positional_embedding", "text/positional_embedding", SAME),
    ("ln_final.weight", "text/ln_final/scale", SAME),
    ("ln_final.bias", "text/ln_final/bias", SAME),
    ("text_projection", "text/text_projection", SAME),
    ("logit_scale", "logit_scale", SCALAR),
)
# Per block, relative to '<tower prefix>N.' and 'layers_N/'; a pruned sub-layer has none.
ATTN = (
    ("ln_1.weight", "ln_1/scale", SAME),
    ("ln_1.bias", "ln_1/bias", SAME),
    ("attn.in_proj_weight", "attn/in_proj_kernel", IN_PROJ),
    ("attn.in_proj_bias", "attn/in_proj_bias", IN_BIAS),
    ("attn.out_proj.weight", "attn/out_proj_kernel", OUT_PROJ),
    ("attn.out_proj.bias", "attn/out_proj_bias", SAME),
)
MLP = (
    ("ln_2.weight", "ln_2/scale", SAME),
    ("ln_2.bias", "ln_2/bias", SAME),
    ("mlp.c_fc.weight", "mlp/c_fc/kernel", LINEAR),
    ("mlp.c_fc.bias", "mlp/c_fc/bias", SAME),
    ("mlp.c_proj.weight", "mlp/c_proj/kernel", LINEAR),
    ("mlp.c_proj.bias", "mlp/c_proj/bias", SAME),
)
TOWERS = (("visual", "visual.transformer.resblocks."), ("text", "transformer.resblocks."))


# ----------------------------------------------------------------------------- keys

def _rename(key: str) -> str:
  while key.startswith("module."):
    key = key[len("module."):]
  for old, new in PREFIXES:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """OpenAI key names for any accepted layout, without the non-parameter extras."""
  if set(state_dict) == {"state_dict"} and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    name = _rename(str(key))
    if name in DROPPED or name.split(".")[-1] == "attn_mask":
      continue
    if name in out:
      raise CheckpointError(f"keys `{key}` and another one both name `{name}` once prefixes are "
                            "stripped; the checkpoint holds two models, keep only one.")
    out[name] = value
  return out


def _check_is_clip_vit(sd: Mapping[str, Any]) -> None:
  if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
    return
  found = ", ".join(f"`{k}`" for k in sorted(sd)[:4]) or "no keys at all"
  hint = (" It looks like a Hugging Face CLIPModel: convert it with `from_hf`."
          if any(k.startswith(("vision_model.", "text_model.")) for k in sd) else "")
  raise CheckpointError(f"the checkpoint is not an OpenAI/open_clip CLIP ViT state dict: found "
                        f"{found} but expected `visual.conv1.weight`, "
                        f"`visual.transformer.resblocks.0.*` and `token_embedding.weight`.{hint}")


def _dims(sd, key: str, ndim: int, what: str) -> tuple[int, ...]:
  shape = tuple(np.shape(require(sd, key, what)))
  if len(shape) != ndim:
    raise CheckpointError(f"`{key}` ({what}) has shape {shape} but a {ndim}-D tensor was "
                          "expected; the checkpoint is not a standard CLIP ViT.")
  return shape


# ----------------------------------------------------------------------------- config

def block_widths(sd, prefix: str) -> tuple[list[int], list[int]]:
  """Per-block attention widths (heads * head size) and MLP widths from the tensors
  (0 where a sub-layer is absent)."""
  attn, mlp = [], []
  for i in layer_indices(sd, prefix):
    w = sd.get(f"{prefix}{i}.attn.in_proj_weight")
    rows = 0 if w is None else np.shape(w)[0]
    if rows % 3:
      raise CheckpointError(f"`{prefix}{i}.attn.in_proj_weight` has {rows} rows, which is not "
                            "3 * heads * head size (fused q, k, v).")
    attn.append(rows // 3)
    fc = sd.get(f"{prefix}{i}.mlp.c_fc.weight")
    mlp.append(0 if fc is None else np.shape(fc)[0])
  if not attn:
    raise CheckpointError(f"no transformer blocks `{prefix}N.*` were found; a CLIP tower "
                          "needs at least one.")
  return attn, mlp


def text_config(sd, head_dim: int | None, eot_token_id: int | None) -> TextConfig:
  """The text tower of a normalized state dict (ViT and ResNet models alike)."""
  vocab, width = _dims(sd, "token_embedding.weight", 2, "token embedding")
  context = _dims(sd, "positional_embedding", 2, "text positions")[0]
  attn, mlp = block_widths(sd, TOWERS[1][1])
  hd = meta.head_dim("text", attn, head_dim)
  return TextConfig(width=width, heads=[a // hd for a in attn], mlp=mlp, head_dim=hd,
                    vocab_size=vocab, context_length=context,
                    eot_token_id=meta.eot_token_id(vocab, eot_token_id))


def infer_config(sd: Mapping[str, Any], activation: str, vision_head_dim: int | None = None,
                 text_head_dim: int | None = None,
                 eot_token_id: int | None = None) -> CLIPConfig:
  """The model config implied by the shapes of a normalized state dict and the facts
  they do not hold (None: the rule of `meta`, 64-channel heads or a refusal)."""
  width, chans, patch, patch_w = _dims(sd, "visual.conv1.weight", 4, "patch embedding")
  if chans != 3 or patch != patch_w:
    raise CheckpointError(f"`visual.conv1.weight` has shape {(width, chans, patch, patch_w)} but "
                          "a square patch embedding over 3 channels (W, 3, p, p) was expected.")
  tokens = _dims(sd, "visual.positional_embedding", 2, "vision positions")[0]
  grid = math.isqrt(max(tokens - 1, 0))
  if grid * grid + 1 != tokens:
    raise CheckpointError(f"`visual.positional_embedding` has {tokens} rows but a square grid "
                          "plus a class token (g*g+1 rows) was expected.")
  embed_dim = _dims(sd, "visual.proj", 2, "image projection")[1]
  v_attn, v_mlp = block_widths(sd, TOWERS[0][1])
  v_hd = meta.head_dim("vision", v_attn, vision_head_dim, vit_width=width)
  return CLIPConfig(
      embed_dim=embed_dim, activation=activation,
      vision=VisionConfig(width=width, heads=[a // v_hd for a in v_attn], mlp=v_mlp,
                          head_dim=v_hd, image_size=grid * patch, patch_size=patch),
      text=text_config(sd, text_head_dim, eot_token_id))


def _entries(config: CLIPConfig):
  """(state-dict key, canonical path, layout, head_dim) for every tensor of `config`."""
  for key, path, layout in TOP:
    yield key, path, layout, 0
  for (tower, prefix), cfg in zip(TOWERS, (config.vision, config.text)):
    for i, (heads, mlp) in enumerate(zip(cfg.heads, cfg.mlp)):
      for present, table in ((heads, ATTN), (mlp, MLP)):
        if present:
          for key, path, layout in table:
            yield f"{prefix}{i}.{key}", f"{tower}/layers_{i}/{path}", layout, cfg.head_dim


# ----------------------------------------------------------------------------- maps

def from_openai(state_dict: Mapping[str, Any], activation: str,
                vision_head_dim: int | None = None, text_head_dim: int | None = None,
                eot_token_id: int | None = None) -> tuple[dict, CLIPConfig]:
  """(params, config) from an OpenAI/open_clip/TinyCLIP state dict of numpy arrays.

  State dicts do not record the activation ('quick_gelu' for OpenAI's checkpoints,
  'gelu' for most open_clip-trained ones), the head sizes or the end-of-text id; a
  head size or id left None is assumed or refused as `convert.meta` describes.
  """
  if tinyclip.is_tinyclip(state_dict):  # pruned blocks may be missing: close the gaps
    state_dict = tinyclip.openai_keys(state_dict)
  sd = normalize_keys(state_dict)
  from tinyclip_jax.convert import resnet  # pylint: disable=import-outside-toplevel
  if resnet.is_resnet(sd):  # OpenAI's RN50/RN101…, TinyCLIP's ResNet students
    return resnet.from_openai(sd, activation, vision_head_dim, text_head_dim, eot_token_id)
  _check_is_clip_vit(sd)
  config = infer_config(sd, activation, vision_head_dim, text_head_dim, eot_token_id)
  flat, extra = take_entries(sd, _entries(config))
  if extra:
    raise CheckpointError(f"key `{extra[0]}` (and {len(extra) - 1} more) has no place in a CLIP "
                          "ViT model with plain pre-LN blocks; expected only OpenAI/open_clip "
                          "CLIP keys (no layer scale, no logit_bias, no attention pooling).")
  params = unflatten(flat)
  check_params(params, config)
  return params, config


def to_open_clip(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
  """open_clip `CLIP(...).state_dict()` for a model of `config` (float32 arrays);
  pruned transformer towers are zero-padded to uniform widths (exact, logged)."""
  if config.vision.kind == "resnet":
    from tinyclip_jax.convert import resnet  # pylint: disable=import-outside-toplevel
    return resnet.to_open_clip(params, config)
  check_params(params, config)
  params, config = pad_uniform(params, config, FORMAT)
  tower_layout(config.vision, "vision", FORMAT)
  tower_layout(config.text, "text", FORMAT)
  flat = flatten(params)
  return {key: from_canonical(layout, flat[path]) for key, path, layout, _ in _entries(config)}
