"""Transformer building blocks shared by the vision and text towers.

Every parameter carries logical axis names (see `tinyclip_jax.parallel` for the
table that maps them onto a mesh). Dense layers flatten their input to 2-D
before the matmul: XLA on CPU differentiates 3-D batched dots slowly, and the
2-D form is the same math everywhere.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

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


_fallbacks: set[str] = set()  # why cuDNN attention was not used, logged once each


def dot_product_attention(q, k, v, causal: bool, kv_lengths=None, implementation=None):
  """q (b, t, h, d), k and v (b, s, h, d) → (b, t, h, d), through
  jax.nn.dot_product_attention (logits and softmax in float32 whatever the inputs).
  kv_lengths (b,): row i attends to its first kv_lengths[i] keys only (one query per
  row at that position, causal). implementation "cudnn": the fused kernel where it
  takes these shapes and dtypes; where it does not (or on a machine without cuDNN)
  the same call through XLA, decided while tracing."""
  # q scaled first, in the compute dtype, as torch does (and as this model always has).
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  kw = dict(scale=1.0, is_causal=causal and kv_lengths is None,
            key_value_seq_lengths=kv_lengths)
  if implementation == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
    except (NotImplementedError, RuntimeError, ValueError) as e:
      if str(e) not in _fallbacks:
        _fallbacks.add(str(e))
        logging.info("attention %s x %s through XLA, not cuDNN: %s", q.shape, k.shape, e)
  elif implementation not in (None, "xla"):
    raise ValueError(f"attention implementation {implementation!r} is unknown; use None, "
                     "'xla' or 'cudnn'.")
  return jax.nn.dot_product_attention(q, k, v, implementation=None, **kw)


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
  implementation: str | None = None  # of dot_product_attention (models/precision.py)

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

    kv_lengths = None
    if query_index is None:
      qkv = dense_2d(x, w_in.reshape(width, 3 * h * d), b_in.reshape(-1), self.dtype)
      qkv = qkv.reshape(b, n, 3, h, d)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:  # one query per row: project q for that token only
      xq = x[jnp.arange(b), query_index]
      q = dense_2d(xq, w_in[:, 0].reshape(width, h * d), b_in[0].reshape(-1), self.dtype)
      q = q.reshape(b, 1, h, d)
      kv = dense_2d(x, w_in[:, 1:].reshape(width, 2 * h * d), b_in[1:].reshape(-1), self.dtype)
      kv = kv.reshape(b, n, 2, h, d)
      k, v = kv[:, :, 0], kv[:, :, 1]
      if self.causal:  # the query at position i sees keys 0 … i
        kv_lengths = query_index.astype(jnp.int32) + 1
    out = dot_product_attention(q, k, v, self.causal, kv_lengths, self.implementation)
    if head_gate is not None:
      out = out * head_gate.astype(self.dtype)[None, None, :, None]
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
  attention: str | None = None  # implementation of dot_product_attention

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
                    implementation=self.attention, **kw)(y, query_index, gates.get("heads"))
      out = out + gated(y, gates.get("mha"))
    if self.mlp:
      y = LayerNorm(name="ln_2", **kw)(out, keep)
      y = MLP(self.mlp, self.activation, (2 * width) ** -0.5, proj_std, name="mlp",
              **kw)(y, gates.get("intermediate"))
      out = out + gated(y, gates.get("ffn"))
    return out


def layer_gates(gates, i: int | slice, heads: int, mlp: int):
  """Layer i's slice of a tower's gates (rows are padded to the widest layer); with a
  slice, those layers' gates stacked (hidden, shared by all layers, as it is)."""
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


def layer_runs(heads, mlp, last_alone: bool) -> list[tuple[int, int]]:
  """[(start, stop)]: maximal runs of consecutive layers with the same (heads, mlp),
  so the same parameter shapes; with last_alone the last layer is a run of its own
  (it computes the pooled token only)."""
  runs = []
  for i, shape in enumerate(zip(heads, mlp)):
    alone = last_alone and i == len(heads) - 1
    if runs and not alone and shape == (heads[runs[-1][0]], mlp[runs[-1][0]]):
      runs[-1] = (runs[-1][0], i + 1)
    else:
      runs.append((i, i + 1))
  return runs


def _scan_blocks(module, x, block: ResidualBlock, start: int, stop: int, gates, remat: bool):
  """Layers start … stop-1 (identical shapes) as one lax.scan over their parameters,
  stacked here from the stored per-layer subtrees layers_i (storage stays per layer:
  conversion, inheritance and masks read that layout). Same math as the unrolled loop."""
  params = module.variables["params"]
  stacked = jax.tree.map(lambda *a: jnp.stack(a),
                         *[nn.meta.unbox(params[f"layers_{i}"]) for i in range(start, stop)])
  g = layer_gates(gates, slice(start, stop), block.heads, block.mlp) or {}
  hidden = g.pop("hidden", None)

  def body(h, xs):
    p, g_i = xs
    if hidden is not None:
      g_i = dict(g_i, hidden=hidden)
    return block.apply({"params": p}, h, None, g_i or None), None
  if remat:  # as nn.remat on each block: keep only the carry between layers
    body = jax.checkpoint(body, prevent_cse=False)
  return jax.lax.scan(body, x, (stacked, g))[0]


def transformer(x, heads, mlp, head_dim, activation, causal, remat=False, dtype=jnp.float32,
                param_dtype=jnp.float32, pool_index=None, gates=None, attention=None,
                scan_layers=False, module=None):
  """Residual blocks layers_0 … layers_{L-1}; call inside a tower's compact method so
  the blocks sit directly under the tower (the canonical flat layout).

  With pool_index (b,), returns only that token's features (b, W): the last block
  then computes one query and one MLP row per example instead of n (exact, cheaper).
  With scan_layers (and `module`, the tower), each run of two or more identical
  layers is one lax.scan, compiled once however deep the run (benchmarks/README.md:
  compile time). Initialization always creates the layers one by one (the stored
  layout)."""
  block_cls = nn.remat(ResidualBlock) if remat else ResidualBlock
  last = len(heads) - 1
  if pool_index is not None and last < 0:
    return x[jnp.arange(x.shape[0]), pool_index]
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention)
  scan = scan_layers and module is not None and not module.is_initializing()
  for start, stop in layer_runs(heads, mlp, pool_index is not None):
    h, m = heads[start], mlp[start]
    if scan and stop - start > 1:
      block = ResidualBlock(h, m, head_dim, activation, causal, len(heads), parent=None, **kw)
      x = _scan_blocks(module, x, block, start, stop, gates, remat)
      continue
    for i in range(start, stop):
      x = block_cls(h, m, head_dim, activation, causal, len(heads), name=f"layers_{i}", **kw)(
          x, pool_index if i == last else None, layer_gates(gates, i, h, m))
  return x
