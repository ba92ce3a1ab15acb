"""The open_clip name of every canonical leaf, for rules that open_clip states by
parameter name (the weight-decay exclusion of its trainer, which TinyCLIP uses)."""
from __future__ import annotations

from tinyclip_jax.convert import openai
from tinyclip_jax.convert.common import Layout


def open_clip_keys(config) -> dict[str, tuple[str, Layout]]:
  """{canonical path: (open_clip state-dict key, layout)} for every tensor of a model
  of `config`, e.g. 'visual/layers_0/attn/in_proj_bias' → ('visual.transformer.
  resblocks.0.attn.in_proj_bias', IN_BIAS). Pruned per-layer widths are kept as they
  are (no padding); ResNet BatchNorm statistics are included."""
  return {path: (key, layout) for key, path, layout, _ in openai.entries(config)}
