"""open_clip_config.json: what an open_clip or TinyCLIP state dict cannot hold, kept
beside it.

open_clip's hub models carry `open_clip_config.json`, {"model_cfg": {...},
"preprocess_cfg": {...}}, next to their weights; `model_cfg` states what tensors do
not: `quick_gelu`, the image tower's `vision_cfg.head_width`, the text tower's
`text_cfg.heads` and its pooling (`pool_type` 'argmax', or 'eos' at `eos_id`). An
export writes that file (with `model_cfg` when open_clip's CLIP builds the model as
written; TinyCLIP's pruned layout it cannot) and the exact model config under
`tinyclip_jax_config`; an import reads it from beside the weights, checks it against
the tensors and takes the facts from it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import meta, pad
from tinyclip_jax.convert.common import CheckpointError
from tinyclip_jax.models.config import CLIPConfig
from tinyclip_jax.preprocess import CLIP_MEAN, CLIP_STD

NAME = "open_clip_config.json"
# open_clip's CLIPVisionCfg / CLIPTextCfg defaults, for files that omit a field.
VISION = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
          "image_size": 224}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
        "mlp_ratio": 4.0, "pool_type": "argmax"}
# Fields that change what the model computes without changing any tensor shape (or
# that the weights would refuse less clearly), with the values this model implements.
_PLAIN = {"act_kwargs": (None, {}), "norm_kwargs": (None, {}), "final_ln_after_pool": (False,),
          "ls_init_value": (None,), "qk_norm": (False,), "scaled_cosine_attn": (False,),
          "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
          "scale_fc": (False,)}
SUPPORTED = {
    "vision_cfg": {**_PLAIN, "pool_type": ("tok",), "attentional_pool": (False,),
                   "no_ln_pre": (False,), "pos_embed_type": ("learnable",),
                   "timm_model_name": (None,)},
    "text_cfg": {**_PLAIN, "pool_type": ("argmax", "eos"), "no_causal_mask": (False,),
                 "embed_cls": (False,), "text_arch": ("clip",), "hf_model_name": (None,),
                 "proj_type": ("linear",), "proj_bias": (False,)},
}


def beside(path: str | os.PathLike) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(os.fspath(path))), NAME)


# ----------------------------------------------------------------------------- writing


def _mlp_ratio(width: int, mlp: int) -> float:
  """A ratio with int(width * ratio) == mlp, open_clip's MLP width rule."""
  ratio = mlp / width
  while int(width * ratio) < mlp:
    ratio = float(np.nextafter(ratio, np.inf))
  return ratio


def model_cfg(config: CLIPConfig) -> dict[str, Any] | None:
  """open_clip's model_cfg of `config`, or None when open_clip cannot build it."""
  v, t = config.vision, config.text
  if not (pad.exportable(v) and pad.exportable(t)):
    return None
  if v.kind == "resnet":
    vision = {"image_size": v.image_size, "layers": list(v.stages), "width": v.width,
              "head_width": v.head_dim, "patch_size": None}
  else:
    vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width,
              "patch_size": v.patch_size, "head_width": v.head_dim,
              "mlp_ratio": _mlp_ratio(v.width, v.mlp[0])}
  text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
          "heads": t.heads[0], "layers": t.layers, "mlp_ratio": _mlp_ratio(t.width, t.mlp[0])}
  if t.eot_token_id != t.vocab_size - 1:  # open_clip's default (the largest id) pools elsewhere
    text.update(pool_type="eos", eos_id=t.eot_token_id)
  return {"embed_dim": config.embed_dim, "quick_gelu": config.activation == "quick_gelu",
          "vision_cfg": vision, "text_cfg": text}


def document(written: CLIPConfig, recorded: CLIPConfig) -> dict[str, Any]:
  """The file for weights of the model `written` that are an export of `recorded`
  (the same model, or the pruned model `written` zero-pads)."""
  doc: dict[str, Any] = {}
  cfg = model_cfg(written)
  if cfg is not None:
    doc["model_cfg"] = cfg
  doc["preprocess_cfg"] = {"size": written.vision.image_size, "mean": list(CLIP_MEAN),
                           "std": list(CLIP_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"}
  doc[meta.RECORD] = recorded.to_dict()
  return doc


# ----------------------------------------------------------------------------- reading


def read(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not readable JSON ({e}).") from None
  if not isinstance(doc, dict) or not ({"model_cfg", meta.RECORD} & set(doc)):
    raise CheckpointError(f"{path} has neither `model_cfg` nor `{meta.RECORD}`, so it is not an "
                          "open_clip model config; move it away or fix it.")
  return doc


def _sections(doc: Mapping[str, Any], where: str) -> tuple[dict, dict, dict]:
  cfg = doc["model_cfg"]
  if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict)
                                          for k in ("vision_cfg", "text_cfg")):
    raise CheckpointError(f"{where} has a `model_cfg` without `vision_cfg` and `text_cfg` "
                          "objects; it is not an open_clip CLIP config.")
  for section, fields in SUPPORTED.items():
    for key, ok in fields.items():
      if key in cfg[section] and cfg[section][key] not in ok:
        raise CheckpointError(f"{where} sets {section}.{key} = {cfg[section][key]!r}, which this "
                              f"model does not implement (it supports {list(ok)}).")
  return cfg, {**VISION, **cfg["vision_cfg"]}, {**TEXT, **cfg["text_cfg"]}


def _heads(width: int, head_width: int, where: str, field: str) -> int:
  heads = width // head_width if head_width > 0 else 0
  if heads < 1 or width % heads:
    raise CheckpointError(f"{where} gives {field} = {head_width}, which does not split width "
                          f"{width} into heads.")
  return heads


def _cfg_facts(doc: Mapping[str, Any], where: str) -> meta.Facts:
  """The facts open_clip's model_cfg states, as open_clip's CLIP builds them."""
  _, v, t = _sections(doc, where)
  width = v["width"] * 32 if isinstance(v["layers"], list) else v["width"]  # ResNet: pool width
  v_hd = width // _heads(width, v["head_width"], where, "vision_cfg.head_width")
  t_heads = int(t["heads"])
  if t_heads < 1 or t["width"] % t_heads:
    raise CheckpointError(f"{where} gives text_cfg.heads = {t_heads}, which does not divide the "
                          f"text width {t['width']}.")
  eot = None  # 'argmax': the largest id, which the import's default end-of-text id matches
  if t["pool_type"] == "eos":
    if not isinstance(t.get("eos_id"), int):
      raise CheckpointError(f"{where} pools the text at 'eos' without an integer "
                            "text_cfg.eos_id; give the tokenizer's end-of-text id.")
    eot = t["eos_id"]
  act = "quick_gelu" if doc["model_cfg"].get("quick_gelu") else "gelu"
  return meta.Facts(act, v_hd, t["width"] // t_heads, eot, where)


def recorded(doc: Mapping[str, Any], where: str) -> CLIPConfig | None:
  value = doc.get(meta.RECORD)
  return None if value is None else meta.recorded_config(value, f"{where}'s `{meta.RECORD}`")


def facts(doc: Mapping[str, Any], where: str) -> meta.Facts:
  """The facts the file states (refused when its two parts contradict each other)."""
  parts = []
  if "model_cfg" in doc:
    parts.append(_cfg_facts(doc, f"{where}'s model_cfg"))
  config = recorded(doc, where)
  if config is not None:
    parts.append(meta.of_config(config, f"{where}'s {meta.RECORD}"))
  return meta.combine(parts)


def _image_size(value, where: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise CheckpointError(f"{where} has a non-square image size {list(value)}; CLIP models "
                            "here take square images.")
    value = value[0]
  return int(value)


def check(doc: Mapping[str, Any], config: CLIPConfig, where: str) -> None:
  """Refuses a model_cfg whose shapes are not those of the weights (`config`)."""
  if "model_cfg" not in doc:
    return
  cfg, v, t = _sections(doc, where)
  vt, tt = config.vision, config.text
  mlp = lambda c: [int(c["width"] * c["mlp_ratio"])]  # noqa: E731 - open_clip's rule
  said = {"embed_dim": (cfg.get("embed_dim"), config.embed_dim),
          "vision_cfg.width": (v["width"], vt.width),
          "vision_cfg.image_size": (_image_size(v["image_size"], where), vt.image_size),
          "text_cfg.width": (t["width"], tt.width), "text_cfg.layers": (t["layers"], tt.layers),
          "text_cfg.context_length": (t["context_length"], tt.context_length),
          "text_cfg.vocab_size": (t["vocab_size"], tt.vocab_size),
          "text_cfg.mlp_ratio": (mlp(t), sorted(set(tt.mlp)))}
  if vt.kind == "resnet":
    said["vision_cfg.layers"] = (v["layers"], list(vt.stages))
  else:
    said.update({"vision_cfg.layers": (v["layers"], vt.layers),
                 "vision_cfg.patch_size": (v["patch_size"], vt.patch_size),
                 "vision_cfg.mlp_ratio": (mlp(v), sorted(set(vt.mlp)))})
  for field, (a, b) in said.items():
    if a != b:
      raise CheckpointError(f"{where} gives {field} {a} but the weights have {b}; it describes "
                            "another model: move it away, or give the right one with "
                            "--open-clip-config=PATH.")
