"""CLIP in Flax linen: the OpenAI/open_clip vision and text towers.

Parameter layout (the canonical one every conversion, inheritance and pruning
function maps; LayerNorms are {scale, bias}):

  visual/conv1 (p, p, 3, W)   visual/class_embedding (W,)
  visual/positional_embedding (g*g+1, W)   visual/ln_pre   visual/layers_i
  visual/ln_post   visual/proj (W, E)
  text/token_embedding (V, W)   text/positional_embedding (C, W)   text/layers_i
  text/ln_final   text/text_projection (W, E)
  logit_scale ()
  (A ResNet image tower has its own visual/ layout: see models/resnet.py.)
  layers_i: ln_1, attn/{in_proj_kernel (W,3,H,64), in_proj_bias (3,H,64),
            out_proj_kernel (H,64,W), out_proj_bias (W,)}, ln_2,
            mlp/{c_fc/{kernel,bias}, c_proj/{kernel,bias}}
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tinyclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from tinyclip_jax.models.layers import LayerNorm, normal, transformer
from tinyclip_jax.models.precision import OUTPUT_DTYPE
from tinyclip_jax.models.resnet import BN_STATS, ModifiedResNet

Dtype = Any


def _hidden_gate(x, gates):
  """Embeddings times the hidden-dim gates, and which dims the LayerNorms keep."""
  hidden = (gates or {}).get("hidden")
  if hidden is None:
    return x, None
  return x * hidden.astype(x.dtype), hidden != 0


class VisionTransformer(nn.Module):
  """Images (B, H, W, 3) float, already normalized → unnormalized embeddings (B, E)."""
  config: VisionConfig
  embed_dim: int
  activation: str
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str | None = None   # see models/precision.py
  scan_layers: bool = False      # see layers.transformer

  def _stack_kw(self) -> dict:
    return dict(attention=self.attention, scan_layers=self.scan_layers, module=self)

  @nn.compact
  def __call__(self, images, train: bool = False, gates=None):  # train: no BatchNorm here
    c = self.config
    b, hgt, wid, ch = images.shape
    if (hgt, wid, ch) != (c.image_size, c.image_size, 3):
      raise ValueError(f"images have shape {images.shape[1:]} but the model expects "
                       f"({c.image_size}, {c.image_size}, 3) NHWC; resize them first.")
    scale = c.width ** -0.5
    p, g = c.patch_size, c.grid
    kernel = self.param("conv1", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), (None, None, None, "embed")),
        (p, p, 3, c.width), self.param_dtype)
    # A stride-p p×p convolution is a matmul over non-overlapping patches.
    patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b * g * g, p * p * 3).astype(self.dtype)
    x = jnp.dot(patches, kernel.reshape(p * p * 3, c.width).astype(self.dtype))
    x = x.reshape(b, g * g, c.width)

    cls = self.param("class_embedding", normal(scale, ("embed",)), (c.width,), self.param_dtype)
    pos = self.param("positional_embedding", normal(scale, (None, "embed")),
                     (g * g + 1, c.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width)), x], axis=1)
    x = x + pos.astype(self.dtype)
    x, keep = _hidden_gate(x, gates)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = LayerNorm(name="ln_pre", **kw)(x, keep)
    x = transformer(x, c.heads, c.mlp, c.head_dim, self.activation, causal=False,
                    remat=self.remat, pool_index=jnp.zeros((b,), jnp.int32), gates=gates,
                    **self._stack_kw(), **kw)
    x = LayerNorm(name="ln_post", **kw)(x, keep)  # the class token
    proj = self.param("proj", normal(scale, ("embed", "proj")), (c.width, self.embed_dim),
                      self.param_dtype)
    return jnp.dot(x, proj.astype(self.dtype)).astype(OUTPUT_DTYPE)


class TextTransformer(nn.Module):
  """Token ids (B, C) int32 → unnormalized embeddings (B, E), pooled at the first
  position holding `config.eot_token_id` (transformers' rule; position 0 when a row
  has none). OpenAI pools at the largest id, which agrees only while no id above the
  end-of-text id appears (it moves as soon as a vocabulary gains tokens)."""
  config: TextConfig
  embed_dim: int
  activation: str
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str | None = None   # see models/precision.py
  scan_layers: bool = False      # see layers.transformer

  def _stack_kw(self) -> dict:
    return dict(attention=self.attention, scan_layers=self.scan_layers, module=self)

  @nn.compact
  def __call__(self, tokens, gates=None):
    c = self.config
    b, n = tokens.shape
    if n > c.context_length:
      raise ValueError(f"texts have {n} tokens but the model's context is {c.context_length}; "
                       "tokenize with context_length=model.text.context_length.")
    emb = self.param("token_embedding", normal(0.02, ("vocab", "embed")),
                     (c.vocab_size, c.width), self.param_dtype)
    pos = self.param("positional_embedding", normal(0.01, (None, "embed")),
                     (c.context_length, c.width), self.param_dtype)
    x = jnp.take(emb, tokens, axis=0).astype(self.dtype) + pos[:n].astype(self.dtype)
    x, keep = _hidden_gate(x, gates)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # argmax of a boolean row: its first True (0 if none). LayerNorm is per token: pool first.
    eot = jnp.argmax(tokens == c.eot_token_id, axis=-1)
    x = transformer(x, c.heads, c.mlp, c.head_dim, self.activation, causal=True,
                    remat=self.remat, pool_index=eot, gates=gates, **self._stack_kw(), **kw)
    x = LayerNorm(name="ln_final", **kw)(x, keep)
    proj = self.param("text_projection", normal(c.width ** -0.5, ("embed", "proj")),
                      (c.width, self.embed_dim), self.param_dtype)
    return jnp.dot(x, proj.astype(self.dtype)).astype(OUTPUT_DTYPE)


def l2_normalize(x, eps: float = 0.0):
  x = x.astype(OUTPUT_DTYPE)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps or 1e-12)


class CLIP(nn.Module):
  """Two towers and a learned log-temperature.

  encode_image / encode_text return unnormalized projected embeddings (as OpenAI's
  and HF's do); __call__ returns L2-normalized ones and exp(logit_scale).
  """
  config: CLIPConfig
  remat: bool = False
  dtype: Dtype = jnp.float32          # compute (models/precision.py)
  param_dtype: Dtype = jnp.float32
  attention: str | None = None        # dot_product_attention's implementation
  scan_layers: bool = False           # runs of identical layers as one lax.scan

  def setup(self):
    c = self.config
    kw = dict(activation=c.activation, remat=self.remat, dtype=self.dtype,
              param_dtype=self.param_dtype, attention=self.attention,
              scan_layers=self.scan_layers)
    if c.vision.kind == "resnet":
      self.visual = ModifiedResNet(c.vision, c.embed_dim, remat=self.remat, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
    else:
      self.visual = VisionTransformer(c.vision, c.embed_dim, **kw)
    self.text = TextTransformer(c.text, c.embed_dim, **kw)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(math.log(1 / 0.07)), ()),
        (), self.param_dtype)

  def _visual(self, images, train: bool, gates):
    if gates is None:
      return self.visual(images, train)
    if self.config.vision.kind != "vit":
      raise ValueError("structure masks apply to transformer towers; this vision tower is a "
                       f"{self.config.vision.kind}.")
    return self.visual(images, train, gates)

  def encode_image(self, images, train: bool = False, gates=None):
    """train: BatchNorm on the batch's statistics (apply with mutable=['batch_stats'])."""
    return self._visual(images, train, gates)

  def encode_text(self, tokens, gates=None):
    return self.text(tokens, gates)

  def __call__(self, images, tokens, train: bool = False, gates=None):
    """train: BatchNorm on batch statistics (ResNet towers); gates: optional structure
    masks {"visual": {...}, "text": {...}} (inherit/masks.py)."""
    gates = gates or {}
    return {"image_embeds": l2_normalize(self._visual(images, train, gates.get("visual"))),
            "text_embeds": l2_normalize(self.text(tokens, gates.get("text"))),
            "logit_scale": jnp.exp(self.logit_scale.astype(OUTPUT_DTYPE))}


def dummy_inputs(config: CLIPConfig, batch: int = 1):
  s, n = config.vision.image_size, config.text.context_length
  return jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, n), jnp.int32)


# "Weights" below are the params with BatchNorm running statistics merged in, leaf
# `mean`/`var` beside `scale`/`bias` in each BatchNorm (the way a PyTorch state dict
# holds its buffers). Conversion, inheritance, model checkpoints and evaluation pass
# weights around as one tree; only training splits them, because the optimizer must
# see the params alone. For a ViT, weights are exactly the params.

def merge_stats(params, batch_stats):
  """params + the batch_stats collection → one weights tree."""
  if not batch_stats:
    return params
  out = dict(params)
  for key, value in batch_stats.items():
    out[key] = merge_stats(out.get(key, {}), value) if isinstance(value, Mapping) else value
  return out


def split_stats(weights):
  """weights → (params, batch_stats or None): the inverse of merge_stats."""
  params, stats = {}, {}
  for key, value in weights.items():
    if isinstance(value, Mapping):
      p, s = split_stats(value)
      if p:
        params[key] = p
      if s:
        stats[key] = s
    elif key in BN_STATS:
      stats[key] = value
    else:
      params[key] = value
  return params, (stats or None)


def variables(weights) -> dict:
  """The flax variables for `model.apply` (running statistics for BatchNorm)."""
  params, stats = split_stats(weights)
  return {"params": params} if stats is None else {"params": params, "batch_stats": stats}


def init_params(config: CLIPConfig, rng: jax.Array, **model_kw):
  """Plain (unboxed) weights of a freshly initialized model (running statistics of a
  ResNet start at mean 0, variance 1)."""
  model = CLIP(config, **model_kw)
  variables_ = model.init(rng, *dummy_inputs(config))
  return merge_stats(nn.meta.unbox(variables_["params"]), variables_.get("batch_stats"))


def param_shapes(config: CLIPConfig, **model_kw):
  """Shapes of the weights as ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0), **model_kw))


def logical_axes(config: CLIPConfig, **model_kw):
  """The logical axis names of every weight (a pytree of PartitionSpecs); running
  statistics are replicated (one small vector per BatchNorm)."""
  boxed = jax.eval_shape(lambda: CLIP(config, **model_kw).init(
      jax.random.key(0), *dummy_inputs(config)))
  stats = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), boxed.get("batch_stats"))
  return merge_stats(nn.get_partition_spec(boxed["params"]), stats)


def count_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
