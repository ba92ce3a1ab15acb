"""OpenAI's transformer blocks and the text tower in OpenAI's key names — the same
in ViT and ResNet CLIP models, so both image-tower formats share these tables."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tinyclip_jax.convert import meta
from tinyclip_jax.convert.common import (IN_BIAS, IN_PROJ, LINEAR, OUT_PROJ, SAME, SCALAR,
                                         CheckpointError, dims, layer_indices)
from tinyclip_jax.models.config import TextConfig

# (state-dict key, canonical path, layout) of the text tower outside its blocks, and
# the temperature (the last of OpenAI's top-level tensors).
TEXT_TOP = (
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
TEXT_BLOCKS = "transformer.resblocks."


def block_widths(sd: Mapping[str, Any], prefix: str) -> tuple[list[int], list[int]]:
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


def text_config(sd: Mapping[str, Any], head_dim: int | None,
                eot_token_id: int | None) -> TextConfig:
  """The text tower of a normalized state dict (ViT and ResNet models alike)."""
  vocab, width = dims(sd, "token_embedding.weight", 2, "token embedding")
  context = dims(sd, "positional_embedding", 2, "text positions")[0]
  attn, mlp = block_widths(sd, TEXT_BLOCKS)
  hd = meta.head_dim("text", attn, head_dim)
  return TextConfig(width=width, heads=[a // hd for a in attn], mlp=mlp, head_dim=hd,
                    vocab_size=vocab, context_length=context,
                    eot_token_id=meta.eot_token_id(vocab, eot_token_id))


def block_entries(tower: str, prefix: str, cfg):
  """(state-dict key, canonical path, layout, head_dim) of every block of one tower."""
  for i, (heads, mlp) in enumerate(zip(cfg.heads, cfg.mlp)):
    for present, table in ((heads, ATTN), (mlp, MLP)):
      if present:
        for key, path, layout in table:
          yield f"{prefix}{i}.{key}", f"{tower}/layers_{i}/{path}", layout, cfg.head_dim


def text_entries(config):
  """(key, path, layout, head_dim) of the text tower and the temperature."""
  for key, path, layout in TEXT_TOP:
    yield key, path, layout, 0
  yield from block_entries("text", TEXT_BLOCKS, config.text)
