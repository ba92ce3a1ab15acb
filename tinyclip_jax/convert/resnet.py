"""OpenAI / open_clip CLIP state dicts with a modified-ResNet image tower ↔ canonical
weights (pure numpy).

Keys are those of OpenAI's `ModifiedResNet` (RN50, RN101, … in TorchScript archives)
and open_clip's, TinyCLIP's wrapped `_image_encoder.*` layouts included (the prefixes
are stripped by `keys.normalize_keys`). BatchNorm running statistics travel with
the weights (leaves `mean`/`var`); `num_batches_tracked` is dropped on the way in
(PyTorch reads it only when momentum is None, which CLIP never uses) and written as
0 on the way out so open_clip's `load_state_dict(strict=True)` finds every buffer.
The text tower has the same keys as in ViT models (`transformer`'s tables).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import meta, transformer
from tinyclip_jax.convert.common import (CONV, LINEAR, SAME, CheckpointError, check_params, dims,
                                         flatten, from_canonical, layer_indices, take_entries,
                                         tower_layout, unflatten)
from tinyclip_jax.convert.keys import FORMAT
from tinyclip_jax.models.config import RESNET_STRIDE, CLIPConfig, resnet_tower
from tinyclip_jax.models.resnet import stage_blocks

STAGES = 4  # OpenAI's ModifiedResNet always has layer1..layer4
COUNTER = "num_batches_tracked"
BN = (("weight", "scale", SAME), ("bias", "bias", SAME), ("running_mean", "mean", SAME),
      ("running_var", "var", SAME))
# (torch module, canonical module, is BatchNorm) inside one Bottleneck.
BLOCK = (("conv1", "conv1", False), ("bn1", "bn1", True), ("conv2", "conv2", False),
         ("bn2", "bn2", True), ("conv3", "conv3", False), ("bn3", "bn3", True))
DOWNSAMPLE = (("downsample.0", "downsample_conv", False), ("downsample.1", "downsample_bn", True))
STEM = tuple(
    (f"{kind}{i}", f"{kind}{i}", kind == "bn") for i in (1, 2, 3) for kind in ("conv", "bn"))
POOL = tuple((f"attnpool.{p}.{w}", f"attnpool/{p}/{c}", layout)
             for p in ("q_proj", "k_proj", "v_proj", "c_proj")
             for w, c, layout in (("weight", "kernel", LINEAR), ("bias", "bias", SAME)))


def is_resnet(sd: Mapping[str, Any]) -> bool:
  """True for a (normalized) state dict with a ResNet image tower."""
  return any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd)


# ----------------------------------------------------------------------------- config


def _stages(sd) -> list[int]:
  found = sorted({
      int(k.split(".")[1][5:])
      for k in sd
      if k.startswith("visual.layer") and k.split(".")[1][5:].isdigit()
  })
  if found != list(range(1, STAGES + 1)):
    raise CheckpointError(f"the ResNet image tower has stages `visual.layer{{N}}` for N in "
                          f"{found} but OpenAI's modified ResNet has exactly layer1..layer4; "
                          "the checkpoint is truncated or not a CLIP ResNet.")
  return [len(layer_indices(sd, f"visual.layer{s}.")) for s in range(1, STAGES + 1)]


def infer_config(sd: Mapping[str, Any], activation: str, vision_head_dim: int | None = None,
                 text_head_dim: int | None = None,
                 eot_token_id: int | None = None) -> CLIPConfig:
  """The model config implied by the shapes of a normalized ResNet state dict and the
  facts they do not hold (the attention pool's head size among them)."""
  stages = _stages(sd)
  width = dims(sd, "visual.conv3.weight", 4, "last stem convolution")[0]
  tokens, pool_width = dims(sd, "visual.attnpool.positional_embedding", 2,
                            "attention-pool positions")
  grid = math.isqrt(max(tokens - 1, 0))
  if grid * grid + 1 != tokens:
    raise CheckpointError(f"`visual.attnpool.positional_embedding` has {tokens} rows but a "
                          "square grid plus the mean token (g*g+1 rows) was expected.")
  if pool_width != width * 32:
    raise CheckpointError(f"`visual.attnpool.positional_embedding` is {pool_width} wide but the "
                          f"stem width {width} implies {width * 32}; the checkpoint's shapes "
                          "are inconsistent.")
  embed_dim = dims(sd, "visual.attnpool.c_proj.weight", 2, "attention-pool output")[0]
  return CLIPConfig(
      embed_dim=embed_dim,
      activation=activation,
      vision=resnet_tower(width, stages, image_size=grid * RESNET_STRIDE,
                          head_dim=meta.head_dim("vision", [pool_width], vision_head_dim)),
      text=transformer.text_config(sd, text_head_dim, eot_token_id))


def _module(key: str, path: str, is_bn: bool):
  if is_bn:
    for w, c, layout in BN:
      yield f"{key}.{w}", f"{path}/{c}", layout
  else:
    yield f"{key}.weight", f"{path}/kernel", CONV


def vision_entries(config: CLIPConfig):
  """(state-dict key, canonical path, layout) of every tensor of the ResNet tower."""
  v = config.vision
  for key, path, is_bn in STEM:
    yield from _module(f"visual.{key}", f"visual/{path}", is_bn)
  for s, i in stage_blocks(v.stages):
    table = BLOCK + (DOWNSAMPLE if i == 0 else ())  # every first block: stride or 4× width
    for key, path, is_bn in table:
      yield from _module(f"visual.layer{s}.{i}.{key}", f"visual/layer{s}_{i}/{path}", is_bn)
  yield "visual.attnpool.positional_embedding", "visual/attnpool/positional_embedding", SAME
  for key, path, layout in POOL:
    yield f"visual.{key}", f"visual/{path}", layout


def entries(config: CLIPConfig):
  """(key, path, layout, head_dim) for the whole model."""
  for key, path, layout in vision_entries(config):
    yield key, path, layout, 0
  yield from transformer.text_entries(config)


# ----------------------------------------------------------------------------- maps


def read(sd: Mapping[str, Any], activation: str, vision_head_dim: int | None = None,
         text_head_dim: int | None = None,
         eot_token_id: int | None = None) -> tuple[dict, CLIPConfig]:
  """(weights, config) from a normalized ResNet CLIP state dict; the facts state
  dicts do not hold as in `openai.from_openai`."""
  sd = {k: v for k, v in sd.items() if not k.endswith("." + COUNTER)}
  if "token_embedding.weight" not in sd:
    raise CheckpointError("the checkpoint has a ResNet image tower but no text tower "
                          "(`token_embedding.weight` is missing); give a whole CLIP model.")
  config = infer_config(sd, activation, vision_head_dim, text_head_dim, eot_token_id)
  flat, extra = take_entries(sd, entries(config))
  if extra:
    raise CheckpointError(f"key `{extra[0]}` (and {len(extra) - 1} more) has no place in a "
                          f"CLIP ResNet with stages {list(config.vision.stages)}; expected "
                          "only OpenAI/open_clip ModifiedResNet and text keys.")
  params = unflatten(flat)
  check_params(params, config)
  return params, config


def write(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
  """open_clip `CLIP(...).state_dict()` of a ResNet model: float32 tensors, int64
  `num_batches_tracked` buffers."""
  check_params(params, config)
  tower_layout(config.text, "text", FORMAT)
  flat = flatten(params)
  out = {}
  for key, path, layout, _ in entries(config):
    out[key] = from_canonical(layout, flat[path])
    if key.endswith(".running_var"):
      out[key[:-len("running_var")] + COUNTER] = np.zeros((), np.int64)
  return out
