"""A minimal PyTorch OpenAI-style CLIP ViT: the independent reference for the
OpenAI/open_clip state-dict format.

Module and parameter names follow OpenAI's `clip/model.py` and open_clip's `CLIP`,
so `state_dict()` has exactly their keys (the causal mask is a non-persistent
buffer, as in open_clip). Blocks run sequence-first (L, N, D) through
`nn.MultiheadAttention` like OpenAI's. No data-dependent Python control flow, so
`torch.jit.trace` and `torch.jit.script` both work.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def mlp_block(width: int, mlp: int, quick_gelu: bool) -> nn.Sequential:
  return nn.Sequential(OrderedDict([
      ("c_fc", nn.Linear(width, mlp)),
      ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
      ("c_proj", nn.Linear(mlp, width)),
  ]))


class ResidualAttentionBlock(nn.Module):
  def __init__(self, width: int, heads: int, mlp: int, quick_gelu: bool):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = mlp_block(width, mlp, quick_gelu)

  def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width: int, layers: int, heads: int, mlp: int, quick_gelu: bool):
    super().__init__()
    self.resblocks = nn.ModuleList(
        [ResidualAttentionBlock(width, heads, mlp, quick_gelu) for _ in range(layers)])

  def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    for block in self.resblocks:
      x = block(x, attn_mask)
    return x


class VisionTransformer(nn.Module):
  def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               mlp: int, output_dim: int, quick_gelu: bool):
    super().__init__()
    scale = width ** -0.5
    grid = image_size // patch_size
    self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
    self.class_embedding = nn.Parameter(scale * torch.randn(width))
    self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, mlp, quick_gelu)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv1(x)  # (N, W, g, g)
    x = x.flatten(2).permute(0, 2, 1)  # (N, g*g, W)
    cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
    x = self.ln_pre(x).permute(1, 0, 2)  # (L, N, W)
    x = self.transformer(x).permute(1, 0, 2)
    return self.ln_post(x[:, 0, :]) @ self.proj


class TextCLIP(nn.Module):
  """OpenAI's CLIP around a given image tower `visual`: the text tower, projection,
  logit scale and causal mask, `encode_image`, `encode_text`, `forward`."""

  def __init__(self, visual: nn.Module, embed_dim: int, context_length: int, vocab_size: int,
               text_width: int, text_layers: int, text_heads: int, text_mlp: int,
               quick_gelu: bool, eot_token_id: int):
    super().__init__()
    self.context_length = context_length
    self.eot_token_id = eot_token_id
    self.visual = visual
    self.transformer = Transformer(text_width, text_layers, text_heads, text_mlp, quick_gelu)
    self.token_embedding = nn.Embedding(vocab_size, text_width)
    self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, text_width))
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(text_width ** -0.5 * torch.randn(text_width, embed_dim))
    self.logit_scale = nn.Parameter(torch.ones([]) * 2.6592)
    mask = torch.full((context_length, context_length), float("-inf")).triu(1)
    self.register_buffer("attn_mask", mask, persistent=False)

  def encode_image(self, image: torch.Tensor) -> torch.Tensor:
    return self.visual(image)

  def encode_text(self, text: torch.Tensor) -> torch.Tensor:
    n = text.shape[1]
    x = self.token_embedding(text) + self.positional_embedding[:n]
    x = self.transformer(x.permute(1, 0, 2), self.attn_mask[:n, :n]).permute(1, 0, 2)
    x = self.ln_final(x)
    # Pool at the first end-of-text token, as transformers does (OpenAI's largest-id
    # rule agrees only while no id above it appears).
    x = x[torch.arange(x.shape[0]), (text == self.eot_token_id).int().argmax(dim=-1)]
    return x @ self.text_projection

  def forward(self, image: torch.Tensor, text: torch.Tensor):
    image_features = F.normalize(self.encode_image(image), dim=-1)
    text_features = F.normalize(self.encode_text(text), dim=-1)
    return image_features, text_features, self.logit_scale.exp()


class CLIP(TextCLIP):
  """OpenAI's CLIP with a ViT image tower: `encode_image(NCHW)`, `encode_text(ids)`."""

  def __init__(self, embed_dim: int, image_size: int, patch_size: int, vision_width: int,
               vision_layers: int, vision_heads: int, vision_mlp: int, context_length: int,
               vocab_size: int, text_width: int, text_layers: int, text_heads: int,
               text_mlp: int, quick_gelu: bool, eot_token_id: int):
    super().__init__(
        VisionTransformer(image_size, patch_size, vision_width, vision_layers, vision_heads,
                          vision_mlp, embed_dim, quick_gelu),
        embed_dim, context_length, vocab_size, text_width, text_layers, text_heads, text_mlp,
        quick_gelu, eot_token_id)

  @classmethod
  def from_config(cls, config) -> "CLIP":
    """From a `tinyclip_jax` CLIPConfig with uniform towers (heads * head_dim == width)."""
    v, t = config.vision, config.text
    for name, tower in (("vision", v), ("text", t)):
      if not tower.uniform or tower.heads[0] * tower.head_dim != tower.width:
        raise ValueError(f"the {name} tower must be uniform with heads * head_dim == width.")
    return cls(config.embed_dim, v.image_size, v.patch_size, v.width, v.layers, v.heads[0],
               v.mlp[0], t.context_length, t.vocab_size, t.width, t.layers, t.heads[0],
               t.mlp[0], quick_gelu=config.activation == "quick_gelu",
               eot_token_id=t.eot_token_id)


# ----------------------------------------------------------------------------- pruned towers
# TinyCLIP's pruned models: per-layer heads and MLP widths, sub-layers that are gone
# (no `ln_1`/`attn` or `ln_2`/`mlp` keys), blocks that are gone entirely (a gap in
# the block numbers), and a hidden width that need not be heads * 64.


class PrunedAttention(nn.Module):
  """Multi-head attention in plain torch ops with OpenAI's parameter names, for any
  `heads * head_dim` (nn.MultiheadAttention needs it to equal the width)."""

  def __init__(self, width: int, heads: int, head_dim: int = 64):
    super().__init__()
    self.heads, self.head_dim = heads, head_dim
    self.in_proj_weight = nn.Parameter(width ** -0.5 * torch.randn(3 * heads * head_dim, width))
    self.in_proj_bias = nn.Parameter(torch.zeros(3 * heads * head_dim))
    self.out_proj = nn.Linear(heads * head_dim, width)

  def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    n, b, _ = x.shape  # sequence-first, like OpenAI's blocks
    q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, b, self.heads, self.head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
    logits = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)
    if attn_mask is not None:
      logits = logits + attn_mask
    out = logits.softmax(dim=-1) @ v  # (b, h, n, d)
    return self.out_proj(out.permute(2, 0, 1, 3).reshape(n, b, self.heads * self.head_dim))


class PrunedBlock(nn.Module):
  """Pre-LN block whose attention (heads == 0) or MLP (mlp == 0) may be gone."""

  def __init__(self, width: int, heads: int, mlp: int, quick_gelu: bool, head_dim: int = 64):
    super().__init__()
    self.has_attn, self.has_mlp = heads > 0, mlp > 0
    if self.has_attn:
      self.ln_1 = nn.LayerNorm(width)
      self.attn = PrunedAttention(width, heads, head_dim)
    if self.has_mlp:
      self.ln_2 = nn.LayerNorm(width)
      self.mlp = mlp_block(width, mlp, quick_gelu)

  def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    if self.has_attn:
      x = x + self.attn(self.ln_1(x), attn_mask)
    if self.has_mlp:
      x = x + self.mlp(self.ln_2(x))
    return x


class PrunedTransformer(Transformer):
  def __init__(self, width: int, heads, mlp, quick_gelu: bool, head_dim: int = 64):
    nn.Module.__init__(self)
    self.resblocks = nn.ModuleList(
        [PrunedBlock(width, h, m, quick_gelu, head_dim) for h, m in zip(heads, mlp)])


def pruned_clip(config) -> CLIP:
  """The OpenAI-layout CLIP of a `tinyclip_jax` CLIPConfig with per-layer heads and MLP
  widths (0: that sub-layer is gone) and any width; a layer with neither has no
  parameters, so its block index is missing from the state dict."""
  v, t = config.vision, config.text
  quick = config.activation == "quick_gelu"
  model = CLIP(config.embed_dim, v.image_size, v.patch_size, v.width, 0, 1, 1, t.context_length,
               t.vocab_size, t.width, 0, 1, 1, quick_gelu=quick, eot_token_id=t.eot_token_id)
  model.visual.transformer = PrunedTransformer(v.width, v.heads, v.mlp, quick, v.head_dim)
  model.transformer = PrunedTransformer(t.width, t.heads, t.mlp, quick, t.head_dim)
  return model
