"""OpenAI's modified ResNet image tower (CLIP RN50/RN101, TinyCLIP ResNet-30M/19M).

Differences from a torchvision ResNet, as in OpenAI's `clip/model.py` and open_clip's
`ModifiedResNet`: a stem of three 3×3 convolutions (the first with stride 2) and a
2×2 average pool instead of one 7×7 convolution and a max pool; bottlenecks that
downsample with an average pool before their last 1×1 convolution (anti-aliased
strides), also on the shortcut; and an attention pool (one query, the mean of the
final feature map, over the map plus a learned positional embedding) instead of
global average pooling.

Parameter layout under `visual/` (convolution kernels are (kh, kw, in, out), NHWC):

  conv{1,2,3}/kernel   bn{1,2,3}                   the stem
  layer{s}_{i}/conv{1,2,3}/kernel, bn{1,2,3}       block i of stage s (1-based)
  layer{s}_0/downsample_conv/kernel, downsample_bn (when the shape changes)
  attnpool/positional_embedding (g*g+1, C)   attnpool/{q,k,v,c}_proj/{kernel, bias}

BatchNorm (flax's `nn.BatchNorm`, PyTorch's ε 1e-5 and momentum 0.1, i.e. flax
momentum 0.9) keeps `scale`/`bias` in the `params` collection and the running `mean`/
`var` in `batch_stats`. With `train=True` it normalizes with the statistics of the
batch it is given. Under `jax.jit` with the batch sharded over the mesh that batch is
the global batch, so the statistics are the global batch's — what PyTorch's
SyncBatchNorm computes across GPUs — with no collective written here. One
difference from PyTorch: flax updates the running variance with the biased batch
variance (PyTorch uses the unbiased one, larger by n/(n−1) with n = batch × height ×
width ≥ 10⁴ in practice). Evaluation (`train=False`) uses the running statistics.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tinyclip_jax.models.config import VisionConfig
from tinyclip_jax.models.layers import Dense, normal, ones, zeros

Dtype = Any
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # flax's decay of the running average = 1 − PyTorch's momentum 0.1
BN_STATS = ("mean", "var")  # leaf names of the batch_stats collection
EXPANSION = 4


def conv(features: int, kernel: int, name: str, dtype, param_dtype, stride: int = 1):
  """Bias-free convolution with PyTorch's symmetric `padding=kernel // 2`."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")))


def batch_norm(train: bool, name: str, dtype, param_dtype, zero_scale: bool = False):
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPS,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      scale_init=zeros(("embed",)) if zero_scale else ones(("embed",)),
      bias_init=zeros(("embed",)))


def avg_pool(x, stride: int):
  """PyTorch's AvgPool2d(stride) on NHWC. Sizes divide evenly (image_size is a multiple
  of 32), so it is a reshape and a mean: cheaper to differentiate than reduce_window."""
  if stride == 1:
    return x
  b, h, w, c = x.shape
  return x.reshape(b, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))


class Bottleneck(nn.Module):
  """1×1 → 3×3 → avgpool(stride) → 1×1 (×4 channels), each convolution followed by
  BatchNorm; shortcut avgpool(stride) → 1×1 → BatchNorm when the shape changes."""
  planes: int
  stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = nn.relu(batch_norm(train, "bn1", **kw)(conv(self.planes, 1, "conv1", **kw)(x)))
    out = nn.relu(batch_norm(train, "bn2", **kw)(conv(self.planes, 3, "conv2", **kw)(out)))
    out = avg_pool(out, self.stride)
    out = conv(self.planes * EXPANSION, 1, "conv3", **kw)(out)
    # OpenAI zero-initializes the last BatchNorm's scale: each block starts as identity.
    out = batch_norm(train, "bn3", zero_scale=True, **kw)(out)
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
      identity = conv(self.planes * EXPANSION, 1, "downsample_conv", **kw)(avg_pool(x, self.stride))
      identity = batch_norm(train, "downsample_bn", **kw)(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Multi-head attention of one query (the mean token) over the feature map."""
  heads: int
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h, d = self.heads, c // self.heads
    std = c**-0.5
    tokens = x.reshape(b, hgt * wid, c)  # row-major positions, as torch's flatten(2)
    pos = self.param("positional_embedding", normal(std, (None, "embed")), (hgt * wid + 1, c),
                     self.param_dtype)
    x = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    x = x + pos.astype(self.dtype)
    kw = dict(std=std, dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense(c, ("embed", "mlp"), name="q_proj", **kw)(x[:, 0])
    k = Dense(c, ("embed", "mlp"), name="k_proj", **kw)(x)
    v = Dense(c, ("embed", "mlp"), name="v_proj", **kw)(x)
    q = q.reshape(b, h, d) * jnp.asarray(d**-0.5, self.dtype)
    logits = jnp.einsum("bhd,bnhd->bhn", q, k.reshape(b, -1, h, d)).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhn,bnhd->bhd", probs, v.reshape(b, -1, h, d)).reshape(b, c)
    return Dense(self.out_dim, ("mlp", "proj"), name="c_proj", **kw)(out)


class ModifiedResNet(nn.Module):
  """Images (B, H, W, 3) float, already normalized → unnormalized embeddings (B, E)."""
  config: VisionConfig
  embed_dim: int
  remat: bool = False  # recompute each bottleneck's activations in the backward pass
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    c = self.config
    if images.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"images have shape {images.shape[1:]} but the model expects "
                       f"({c.image_size}, {c.image_size}, 3) NHWC; resize them first.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    for i, (features, stride) in enumerate(((c.width // 2, 2), (c.width // 2, 1), (c.width, 1)),
                                           start=1):
      x = conv(features, 3, f"conv{i}", stride=stride, **kw)(x)
      x = nn.relu(batch_norm(train, f"bn{i}", **kw)(x))
    x = avg_pool(x, 2)
    # `train` (argument 2, counting the module) is a Python bool: static under remat.
    block = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    for s, blocks in enumerate(c.stages, start=1):
      for i in range(blocks):
        stride = 2 if s > 1 and i == 0 else 1
        x = block(c.width * 2**(s - 1), stride, name=f"layer{s}_{i}", **kw)(x, train)
    x = AttentionPool2d(c.pool_heads, self.embed_dim, name="attnpool", **kw)(x)
    return x.astype(jnp.float32)


def stage_blocks(stages: Sequence[int]) -> list[tuple[int, int]]:
  """(stage, block) of every bottleneck, stages numbered from 1 as in the layout."""
  return [(s, i) for s, n in enumerate(stages, start=1) for i in range(n)]
