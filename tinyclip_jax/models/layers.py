"""Transformer building blocks shared by the vision and text towers.

Every parameter carries logical axis names (see `tinyclip_jax.parallel` for the
table that maps them onto a mesh). Dense layers flatten their input to 2-D
before the matmul: XLA on CPU differentiates 3-D batched dots slowly, and the
2-D form is the same math everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
LN_EPS = 1e-5  # OpenAI CLIP, open_clip and HF all use 1e-5.


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
  # torch.nn.GELU() is the erf form; flax's default is the tanh approximation.
  return jax.nn.gelu(x, approximate=False)


ACTIVATION_FNS: dict[str, Callable] = {"gelu": exact_gelu, "quick_gelu": quick_gelu}


def normal(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, statistics in float32 whatever the compute dtype.

  With `keep` (W,) bool (a hidden-dim mask), statistics are over the kept dims only
  and the dropped dims output 0: exactly a LayerNorm of the pruned width."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, keep=None):
    width = x.shape[-1]
    scale = self.param("scale", ones(("embed",)), (width,), self.param_dtype)
    bias = self.param("bias", zeros(("embed",)), (width,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if keep is None:
      mean = x32.mean(-1, keepdims=True)
      var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    else:
      n = jnp.maximum(keep.sum(), 1).astype(jnp.float32)
      mean = jnp.where(keep, x32, 0.0).sum(-1, keepdims=True) / n
      var = jnp.where(keep, jnp.square(x32 - mean), 0.0).sum(-1, keepdims=True) / n
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    if keep is not None:
      y = jnp.where(keep, y, 0.0)
    return y.astype(self.dtype)


def dense_2d(x, kernel, bias, dtype):
  """x[..., in] @ kernel[in, out] + bias as one 2-D matmul."""
  lead = x.shape[:-1]
  y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.reshape(*lead, kernel.shape[-1])


class Dense(nn.Module):
  """Linear layer with named logical axes (kernel is (in, out), as flax stores it)."""
  features: int
  kernel_axes: tuple[str | None, str | None]
  std: float
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", normal(self.std, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", zeros(self.kernel_axes[1:]), (self.features,), self.param_dtype)
            if self.use_bias else None)
    return dense_2d(x, kernel, bias, self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection.

  in_proj kernel is (width, 3, heads, head_dim): q, k and v of one head sit at
  the same head index, so slicing or pruning heads keeps them together.
  """
  heads: int
  head_dim: int
  causal: bool
  in_std: float
  out_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, query_index=None, head_gate=None):
    """x (b, n, W) → (b, n, W); with query_index (b,) only that token of each row
    attends (to all keys, or the earlier ones when causal) and the result is (b, W).
    head_gate (heads,) scales each head's output before out_proj (structure masks)."""
    b, n, width = x.shape
    h, d = self.heads, self.head_dim
    w_in = self.param("in_proj_kernel", normal(self.in_std, ("embed", None, "heads", "kv")),
                      (width, 3, h, d), self.param_dtype)
    b_in = self.param("in_proj_bias", zeros((None, "heads", "kv")), (3, h, d), self.param_dtype)
    w_out = self.param("out_proj_kernel", normal(self.out_std, ("heads", "kv", "embed")),
                       (h, d, width), self.param_dtype)
    b_out = self.param("out_proj_bias", zeros(("embed",)), (width,), self.param_dtype)

    key_pos = jnp.arange(n)
    if query_index is None:
      qkv = dense_2d(x, w_in.reshape(width, 3 * h * d), b_in.reshape(-1), self.dtype)
      # (3, b, h, n, d): batch dims leading, which XLA's CPU batched dot runs ~4x
      # faster than the "bqhd" einsum layout (benchmarks/README.md).
      q, k, v = qkv.reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)
      query_pos = key_pos[:, None]
    else:  # one query per row: project q for that token only
      xq = x[jnp.arange(b), query_index]
      q = dense_2d(xq, w_in[:, 0].reshape(width, h * d), b_in[0].reshape(-1), self.dtype)
      q = q.reshape(b, 1, h, d).transpose(0, 2, 1, 3)
      kv = dense_2d(x, w_in[:, 1:].reshape(width, 2 * h * d), b_in[1:].reshape(-1), self.dtype)
      k, v = kv.reshape(b, n, 2, h, d).transpose(2, 0, 3, 1, 4)
      query_pos = query_index[:, None, None, None]
    q = q * jnp.asarray(1.0 / math.sqrt(d), self.dtype)  # scale q first, as torch does
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    if self.causal:
      logits = jnp.where(key_pos <= query_pos, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    if head_gate is not None:
      out = out * head_gate.astype(self.dtype)[None, :, None, None]
    out = out.transpose(0, 2, 1, 3)
    out = out.reshape(b, -1, h * d)
    out = dense_2d(out, w_out.reshape(h * d, width), b_out, self.dtype)
    return out if query_index is None else out[:, 0]


class MLP(nn.Module):
  hidden: int
  activation: str
  fc_std: float
  proj_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, unit_gate=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = Dense(self.hidden, ("embed", "mlp"), self.fc_std, name="c_fc", **kw)(x)
    y = ACTIVATION_FNS[self.activation](y)
    if unit_gate is not None:
      y = y * unit_gate.astype(self.dtype)
    return Dense(x.shape[-1], ("mlp", "embed"), self.proj_std, name="c_proj", **kw)(y)


class ResidualBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). heads == 0 or mlp == 0
  means that sub-layer was pruned away and the block has no parameters for it."""
  heads: int
  mlp: int
  head_dim: int
  activation: str
  causal: bool
  num_layers: int  # of the tower, for OpenAI's depth-scaled init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, query_index=None, gates=None):
    """With query_index (b,), only that token's output is computed: (b, W). The
    last block of a tower needs nothing else (its output is pooled there).

    gates (structure masks, see inherit/masks.py), each optional: hidden (W,),
    heads (heads,), intermediate (mlp,), mha (), ffn (); as the reference applies
    them: per head before out_proj, per unit after the activation, hidden on each
    sub-layer's output, mha/ffn on the whole sub-layer."""
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * self.num_layers) ** -0.5
    gates = gates or {}
    hidden = gates.get("hidden")
    keep = None if hidden is None else hidden != 0

    def gated(y, layer_gate):
      if hidden is not None:
        y = y * hidden.astype(y.dtype)
      return y if layer_gate is None else y * layer_gate.astype(y.dtype)

    out = x if query_index is None else x[jnp.arange(x.shape[0]), query_index]
    if self.heads:
      y = LayerNorm(name="ln_1", **kw)(x, keep)
      y = Attention(self.heads, self.head_dim, self.causal, attn_std, proj_std, name="attn",
                    **kw)(y, query_index, gates.get("heads"))
      out = out + gated(y, gates.get("mha"))
    if self.mlp:
      y = LayerNorm(name="ln_2", **kw)(out, keep)
      y = MLP(self.mlp, self.activation, (2 * width) ** -0.5, proj_std, name="mlp",
              **kw)(y, gates.get("intermediate"))
      out = out + gated(y, gates.get("ffn"))
    return out


def layer_gates(gates, i: int, heads: int, mlp: int):
  """Layer i's slice of a tower's gates (rows are padded to the widest layer)."""
  if not gates:
    return None
  out = {}
  for kind, z in gates.items():
    if kind == "hidden":
      out[kind] = z
    elif kind == "heads":
      out[kind] = z[i, :heads]
    elif kind == "intermediate":
      out[kind] = z[i, :mlp]
    else:  # mha / ffn: one gate per layer
      out[kind] = z[i]
  return out


def transformer(x, heads, mlp, head_dim, activation, causal, remat=False, dtype=jnp.float32,
                param_dtype=jnp.float32, pool_index=None, gates=None):
  """Residual blocks layers_0 … layers_{L-1}; call inside a tower's compact method so
  the blocks sit directly under the tower (the canonical flat layout).

  With pool_index (b,), returns only that token's features (b, W): the last block
  then computes one query and one MLP row per example instead of n (exact, cheaper)."""
  block_cls = nn.remat(ResidualBlock) if remat else ResidualBlock
  last = len(heads) - 1
  if pool_index is not None and last < 0:
    return x[jnp.arange(x.shape[0]), pool_index]
  for i, (h, m) in enumerate(zip(heads, mlp)):
    x = block_cls(h, m, head_dim, activation, causal, len(heads), dtype=dtype,
                  param_dtype=param_dtype, name=f"layers_{i}")(
                      x, pool_index if i == last else None, layer_gates(gates, i, h, m))
  return x
