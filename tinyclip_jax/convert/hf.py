"""Hugging Face `transformers.CLIPModel` ↔ canonical params (pure numpy).

HF keeps q, k and v as separate Linears; the canonical layout fuses them like
OpenAI's `in_proj_weight`, so they are concatenated [q; k; v] on the way in.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from absl import logging

from tinyclip_jax.convert import meta
from tinyclip_jax.convert.common import (CONV, IN_BIAS, IN_PROJ, LINEAR, OUT_PROJ, SAME, SCALAR,
                                         CheckpointError, check_params, flatten, from_canonical,
                                         layer_indices, require, to_canonical, tower_layout,
                                         unflatten)
from tinyclip_jax.convert.pad import pad_uniform, padded_config
from tinyclip_jax.models.config import (ACTIVATIONS, CLIP_EOT, CLIPConfig, TextConfig, VisionConfig,
                                        default_eot)
from tinyclip_jax.models.layers import LN_EPS

FORMAT = "a Hugging Face CLIPModel"
BOS, PAD = 49406, 1  # CLIP's <|startoftext|>; HF's pad default
LEGACY_EOS = 2  # transformers pools at the largest id when eos_token_id is 2 (old configs)
# CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit a field.
DEFAULT_HEADS = {"text": 8, "vision": 12}
DEFAULT_ACT = "quick_gelu"

TOP = (
    ("vision_model.embeddings.patch_embedding.weight", "visual/conv1", CONV),
    ("vision_model.embeddings.class_embedding", "visual/class_embedding", SAME),
    ("vision_model.embeddings.position_embedding.weight", "visual/positional_embedding", SAME),
    ("vision_model.pre_layrnorm.weight", "visual/ln_pre/scale", SAME),  # sic, HF's spelling
    ("vision_model.pre_layrnorm.bias", "visual/ln_pre/bias", SAME),
    ("vision_model.post_layernorm.weight", "visual/ln_post/scale", SAME),
    ("vision_model.post_layernorm.bias", "visual/ln_post/bias", SAME),
    ("visual_projection.weight", "visual/proj", LINEAR),
    ("text_model.embeddings.token_embedding.weight", "text/token_embedding", SAME),
    ("text_model.embeddings.position_embedding.weight", "text/positional_embedding", SAME),
    ("text_model.final_layer_norm.weight", "text/ln_final/scale", SAME),
    ("text_model.final_layer_norm.bias", "text/ln_final/bias", SAME),
    ("text_projection.weight", "text/text_projection", LINEAR),
    ("logit_scale", "logit_scale", SCALAR),
)
BLOCK = (
    ("layer_norm1.weight", "ln_1/scale", SAME),
    ("layer_norm1.bias", "ln_1/bias", SAME),
    ("self_attn.out_proj.weight", "attn/out_proj_kernel", OUT_PROJ),
    ("self_attn.out_proj.bias", "attn/out_proj_bias", SAME),
    ("layer_norm2.weight", "ln_2/scale", SAME),
    ("layer_norm2.bias", "ln_2/bias", SAME),
    ("mlp.fc1.weight", "mlp/c_fc/kernel", LINEAR),
    ("mlp.fc1.bias", "mlp/c_fc/bias", SAME),
    ("mlp.fc2.weight", "mlp/c_proj/kernel", LINEAR),
    ("mlp.fc2.bias", "mlp/c_proj/bias", SAME),
)
QKV = ("q_proj", "k_proj", "v_proj")  # fused in this order
FUSED = (("weight", "attn/in_proj_kernel", IN_PROJ), ("bias", "attn/in_proj_bias", IN_BIAS))
TOWERS = (("vision", "visual", "vision_model.encoder.layers."),
          ("text", "text", "text_model.encoder.layers."))


# ----------------------------------------------------------------------------- config

def _tower_config(hf_config: Mapping[str, Any], name: str) -> dict[str, Any]:
  # Old config.json files also carry `<tower>_config_dict`, which HF lets win.
  return {**(hf_config.get(f"{name}_config") or {}), **(hf_config.get(f"{name}_config_dict") or {})}


def _agree(cfg: Mapping[str, Any], field: str, actual: int, evidence: str) -> None:
  said = cfg.get(field)
  if said is not None and int(said) != actual:
    raise CheckpointError(f"config.json says {field} = {said} but the tensors say {actual} "
                          f"({evidence}); the tensors win, so fix config.json or pair it with "
                          "the matching weights.")


def _shape(sd, key: str, ndim: int) -> tuple[int, ...]:
  shape = tuple(np.shape(require(sd, key, f"a {ndim}-D tensor")))
  if len(shape) != ndim:
    raise CheckpointError(f"`{key}` has shape {shape} but a {ndim}-D tensor was expected; the "
                          "checkpoint is not a standard HF CLIPModel.")
  return shape


def _activation(vision: Mapping[str, Any], text: Mapping[str, Any]) -> str:
  acts = {vision.get("hidden_act") or DEFAULT_ACT, text.get("hidden_act") or DEFAULT_ACT}
  if len(acts) > 1 or not acts <= set(ACTIVATIONS):
    raise CheckpointError(f"config.json uses hidden_act {sorted(acts)} but the model supports "
                          f"one activation shared by both towers, one of {ACTIVATIONS}.")
  return acts.pop()


def _heads(cfg: Mapping[str, Any], name: str, width: int) -> int:
  heads = int(cfg.get("num_attention_heads") or DEFAULT_HEADS[name])
  if width % heads:
    raise CheckpointError(f"{name}_config.num_attention_heads = {heads} does not divide the "
                          f"{name} width {width} found in the tensors; fix config.json.")
  return heads


def _layers(sd, cfg, name: str, prefix: str, width: int) -> tuple[list[int], list[int], int]:
  """Per-layer (heads, mlp) and head_dim; HF layers all share one head count."""
  idx = layer_indices(sd, prefix)
  _agree(cfg, "num_hidden_layers", len(idx), f"{name} blocks `{prefix}N`")
  if not idx:
    raise CheckpointError(f"no transformer blocks `{prefix}N.*` were found; a CLIP tower needs "
                          "at least one.")
  mlp = [_shape(sd, f"{prefix}{i}.mlp.fc1.weight", 2)[0] for i in idx]
  for i, m in zip(idx, mlp):
    _agree(cfg, "intermediate_size", m, f"`{prefix}{i}.mlp.fc1.weight`")
  heads = _heads(cfg, name, width)
  return [heads] * len(idx), mlp, width // heads


def _eot(tcfg: Mapping[str, Any], vocab: int) -> int:
  """The id transformers pools the text at, as the model's eot_token_id."""
  eos = tcfg.get("eos_token_id")
  if eos is None:
    return meta.eot_token_id(vocab, None)
  if int(eos) == LEGACY_EOS:  # the largest id: CLIP's end of text, while the vocabulary has no more
    if vocab > CLIP_EOT + 1:
      logging.warning("config.json has the legacy eos_token_id %d, for which transformers pools at "
                      "the largest id, but the vocabulary has %d ids; pooling at the first %d "
                      "(CLIP's end of text) instead", LEGACY_EOS, vocab, default_eot(vocab))
    return default_eot(vocab)
  if not 0 <= int(eos) < vocab:
    raise CheckpointError(f"text_config.eos_token_id = {eos} is outside the vocabulary of {vocab} "
                          "ids; set it to the id the tokenizer ends text with (49407 for CLIP).")
  return int(eos)


def infer_config(sd: Mapping[str, Any], hf_config: Mapping[str, Any]) -> CLIPConfig:
  vcfg, tcfg = _tower_config(hf_config, "vision"), _tower_config(hf_config, "text")
  for name, cfg in (("vision", vcfg), ("text", tcfg)):
    eps = cfg.get("layer_norm_eps")
    if eps is not None and not math.isclose(float(eps), LN_EPS):
      raise CheckpointError(f"{name}_config.layer_norm_eps = {eps} but the model's LayerNorms "
                            f"use {LN_EPS}, as every CLIP does.")
  width, chans, patch, _ = _shape(sd, TOP[0][0], 4)
  _agree(vcfg, "hidden_size", width, f"`{TOP[0][0]}`")
  _agree(vcfg, "patch_size", patch, f"`{TOP[0][0]}`")
  _agree(vcfg, "num_channels", chans, f"`{TOP[0][0]}`")
  tokens = _shape(sd, TOP[2][0], 2)[0]
  grid = math.isqrt(max(tokens - 1, 0))
  if grid * grid + 1 != tokens:
    raise CheckpointError(f"`{TOP[2][0]}` has {tokens} rows but a square grid plus a class "
                          "token (g*g+1 rows) was expected.")
  _agree(vcfg, "image_size", grid * patch, f"`{TOP[2][0]}` has {grid}x{grid}+1 positions")
  vocab, text_width = _shape(sd, TOP[8][0], 2)
  _agree(tcfg, "hidden_size", text_width, f"`{TOP[8][0]}`")
  _agree(tcfg, "vocab_size", vocab, f"`{TOP[8][0]}`")
  context = _shape(sd, TOP[9][0], 2)[0]
  _agree(tcfg, "max_position_embeddings", context, f"`{TOP[9][0]}`")
  embed_dim = _shape(sd, "visual_projection.weight", 2)[0]
  _agree(hf_config, "projection_dim", embed_dim, "`visual_projection.weight`")
  v_heads, v_mlp, v_hd = _layers(sd, vcfg, "vision", TOWERS[0][2], width)
  t_heads, t_mlp, t_hd = _layers(sd, tcfg, "text", TOWERS[1][2], text_width)
  return CLIPConfig(
      embed_dim=embed_dim, activation=_activation(vcfg, tcfg),
      vision=VisionConfig(width=width, heads=v_heads, mlp=v_mlp, head_dim=v_hd,
                          image_size=grid * patch, patch_size=patch),
      text=TextConfig(width=text_width, heads=t_heads, mlp=t_mlp, head_dim=t_hd,
                      vocab_size=vocab, context_length=context, eot_token_id=_eot(tcfg, vocab)))


def _special_ids(t: TextConfig) -> dict[str, int]:
  """bos/eos/pad ids of config.json: eos is the id the model pools at."""
  if t.eot_token_id == LEGACY_EOS:
    raise CheckpointError(f"the model pools text at id {LEGACY_EOS}, which transformers' CLIPModel "
                          "reads as its legacy setting (pool at the largest id), so a Hugging Face "
                          "folder cannot hold it; export it with --dst=open_clip or --dst=flax.")
  bos = BOS if t.vocab_size > CLIP_EOT else max(t.vocab_size - 2, 0)
  return dict(bos_token_id=bos, eos_token_id=t.eot_token_id,
              pad_token_id=min(PAD, t.vocab_size - 1))


def hf_config_dict(config: CLIPConfig) -> dict[str, Any]:
  """config.json contents for `transformers.CLIPConfig(**d)` (of the zero-padded
  model when `config` has pruned towers; see `pad.py`), with `config` itself under
  `tinyclip_jax_config` (transformers keeps unknown keys), so an import restores
  what CLIPModel cannot hold (per-layer widths)."""
  recorded = config.to_dict()
  config = padded_config(config, FORMAT)
  vh, vm = tower_layout(config.vision, "vision", FORMAT)
  th, tm = tower_layout(config.text, "text", FORMAT)
  v, t, e = config.vision, config.text, config.embed_dim
  common = dict(hidden_act=config.activation, layer_norm_eps=LN_EPS, projection_dim=e)
  return {
      "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": e,
      "logit_scale_init_value": 2.6592,
      "vision_config": dict(hidden_size=v.width, intermediate_size=vm, num_hidden_layers=v.layers,
                            num_attention_heads=vh, image_size=v.image_size,
                            patch_size=v.patch_size, num_channels=3, **common),
      "text_config": dict(hidden_size=t.width, intermediate_size=tm, num_hidden_layers=t.layers,
                          num_attention_heads=th, max_position_embeddings=t.context_length,
                          vocab_size=t.vocab_size, **_special_ids(t), **common),
      meta.RECORD: recorded,
  }


# ----------------------------------------------------------------------------- maps

def from_hf(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any]) -> tuple[dict, CLIPConfig]:
  """(params, config) from HF CLIPModel tensors and its config.json dict."""
  sd = {k: v for k, v in state_dict.items() if not k.endswith(".position_ids")}
  if not any(k.startswith("vision_model.") for k in sd) or not any(
      k.startswith("text_model.") for k in sd):
    found = ", ".join(f"`{k}`" for k in sorted(sd)[:4]) or "no keys at all"
    raise CheckpointError(f"the tensors are not a Hugging Face CLIPModel: found {found} but "
                          "expected `vision_model.*`, `text_model.*`, `visual_projection.weight` "
                          "and `text_projection.weight`.")
  config = infer_config(sd, hf_config)
  flat, used = {}, set()
  for key, path, layout in TOP:
    flat[path] = to_canonical(layout, key, require(sd, key, path), 0)
    used.add(key)
  for (_, tower, prefix), cfg in zip(TOWERS, (config.vision, config.text)):
    for i in range(cfg.layers):
      pre, out = f"{prefix}{i}.", f"{tower}/layers_{i}/"
      for key, path, layout in BLOCK:
        flat[out + path] = to_canonical(layout, pre + key, require(sd, pre + key, path),
                                        cfg.head_dim)
        used.add(pre + key)
      for part, path, layout in FUSED:
        keys = [f"{pre}self_attn.{p}.{part}" for p in QKV]
        fused = np.concatenate([np.asarray(require(sd, k, path), np.float32) for k in keys])
        flat[out + path] = to_canonical(layout, keys[0], fused, cfg.head_dim)
        used.update(keys)
  extra = sorted(sd.keys() - used)
  if extra:
    raise CheckpointError(f"key `{extra[0]}` (and {len(extra) - 1} more) has no place in a "
                          "CLIPModel with this config; expected only CLIPModel's own tensors.")
  params = unflatten(flat)
  check_params(params, config)
  recorded = hf_config.get(meta.RECORD)
  if recorded is None:
    return params, config
  where = f"config.json's `{meta.RECORD}`"
  return meta.reconcile(params, config, meta.recorded_config(recorded, where), where, FORMAT)


def to_hf(params: Mapping[str, Any], config: CLIPConfig) -> tuple[dict[str, np.ndarray], dict]:
  """HF CLIPModel tensors (float32) and config.json contents for `params`; pruned
  towers are zero-padded to uniform widths (exact, logged)."""
  if config.vision.kind == "resnet":
    raise CheckpointError("Hugging Face CLIPModel has no ResNet image tower, so a ResNet CLIP "
                          "cannot be exported to hf; export it to open_clip instead "
                          "(--dst=open_clip:MODEL.safetensors).")
  check_params(params, config)
  hf_config = hf_config_dict(config)
  params, config = pad_uniform(params, config, FORMAT)
  flat = flatten(params)
  sd = {key: from_canonical(layout, flat[path]) for key, path, layout in TOP}
  for (_, tower, prefix), cfg in zip(TOWERS, (config.vision, config.text)):
    for i in range(cfg.layers):
      pre, out = f"{prefix}{i}.", f"{tower}/layers_{i}/"
      for key, path, layout in BLOCK:
        sd[pre + key] = from_canonical(layout, flat[out + path])
      for part, path, layout in FUSED:
        for p, chunk in zip(QKV, np.split(from_canonical(layout, flat[out + path]), 3)):
          sd[f"{pre}self_attn.{p}.{part}"] = np.ascontiguousarray(chunk)
  return sd, hf_config
