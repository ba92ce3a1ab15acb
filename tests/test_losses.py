"""Distillation losses: torch parity, sharded == global, HLO has no BxB matrix.

Tolerances (measured comfortably inside them; see assert_close, which is relative
to the largest magnitude of the reference array):
  * vs. torch float64 reference: 1e-10 for JAX float64 (measured ~1e-15), 1e-5
    for JAX float32 (measured ~4e-7).
  * sharded (8 CPU devices) vs. single-device JAX: 1e-6 in float32 with HIGHEST
    matmul precision (measured ~2e-7), 1e-12 in float64 (measured ~5e-16).
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, PartitionSpec as P

from tinyclip_jax.losses import LossConfig, distill_loss, sharded_distill_loss

B, D = 16, 8
ALL_TERMS = ("affinity_i2t", "affinity_t2i", "affinity", "clip", "image_image",
             "text_text", "embedding", "total")

CONFIGS = [
    LossConfig(),                                   # alpha=1: affinity only
    LossConfig(alpha=0.5),
    LossConfig(alpha=0.0),                          # CLIP only, teacher present
    LossConfig(alpha=0.5, distill_weight=2.0, image_image=0.3),
    LossConfig(alpha=1.0, text_text=0.7),
    LossConfig(alpha=1.0, embedding=0.2),
    LossConfig(alpha=0.5, distill_weight=1.5, image_image=0.4, text_text=0.6, embedding=0.25),
]
SCALES = [(50.0, 50.0), (12.3, 30.0)]


def _normed(rng, n, d, spread=0.5):
  # A shared direction + noise: cosines are high, so even at scale 50 the
  # I2I / T2T softmaxes are not one-hot on the diagonal (terms stay informative).
  x = rng.normal(size=(1, d)) + spread * rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed=0, n=B, d=D, scales=(50.0, 50.0), d_teacher=None):
  rng = np.random.default_rng(seed)
  student = {"image_embeds": _normed(rng, n, d), "text_embeds": _normed(rng, n, d),
             "logit_scale": np.float64(scales[0])}
  dt = d_teacher or d
  teacher = {"image_embeds": _normed(rng, n, dt), "text_embeds": _normed(rng, n, dt),
             "logit_scale": np.float64(scales[1])}
  return student, teacher


def cast(tree, dtype):
  return jax.tree.map(lambda x: np.asarray(x, dtype), tree)


def assert_close(actual, expected, rtol, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, what
  err = np.max(np.abs(actual - expected))
  scale = max(np.max(np.abs(expected)), 1e-30)
  assert err <= rtol * scale, f"{what}: max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


# ---------------------------------------------------------------- torch reference

def torch_distill(student, teacher, cfg: LossConfig):
  """Same formula, written independently with torch ops (float64)."""
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
  i_s = t(student["image_embeds"]).requires_grad_()
  t_s = t(student["text_embeds"]).requires_grad_()
  tau_s = t(student["logit_scale"]).requires_grad_()
  n = i_s.shape[0]
  labels = torch.arange(n)

  def soft_ce(s_logits, t_logits):
    return -(torch.softmax(t_logits, -1) * torch.log_softmax(s_logits, -1)).sum(-1).mean()

  terms = {}
  if teacher is not None:
    i_t, t_t, tau_t = t(teacher["image_embeds"]), t(teacher["text_embeds"]), t(teacher["logit_scale"])
    terms["affinity_i2t"] = soft_ce(tau_s * i_s @ t_s.T, tau_t * i_t @ t_t.T)
    terms["affinity_t2i"] = soft_ce(tau_s * t_s @ i_s.T, tau_t * t_t @ i_t.T)
    terms["affinity"] = 0.5 * terms["affinity_i2t"] + 0.5 * terms["affinity_t2i"]
    terms["image_image"] = soft_ce(tau_s * i_s @ i_s.T, tau_t * i_t @ i_t.T)
    terms["text_text"] = soft_ce(tau_s * t_s @ t_s.T, tau_t * t_t @ t_t.T)
    terms["embedding"] = 0.5 * (((i_s - i_t) ** 2).sum(-1).mean()
                                + ((t_s - t_t) ** 2).sum(-1).mean())
  logits = tau_s * i_s @ t_s.T
  terms["clip"] = 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits.T, labels)
  w = cfg.distill_weight
  total = (1 - cfg.alpha) * w * terms["clip"]
  if teacher is not None:
    total = (total + cfg.alpha * w * terms["affinity"] + cfg.image_image * terms["image_image"]
             + cfg.text_text * terms["text_text"] + cfg.embedding * terms["embedding"])
  total.backward()
  grads = {"image_embeds": i_s.grad.numpy(), "text_embeds": t_s.grad.numpy(),
           "logit_scale": tau_s.grad.numpy()}
  return total.item(), {k: v.item() for k, v in terms.items()}, grads


def jax_loss_and_grad(student, teacher, cfg, fn=None, jit=True):
  fn = jax.value_and_grad(fn or (lambda s, t: distill_loss(s, t, cfg)), has_aux=True)
  (loss, terms), grads = (jax.jit(fn) if jit else fn)(student, teacher)
  return loss, terms, grads


def _expected_keys(cfg, has_teacher):
  keys = {"total"}
  if cfg.alpha != 1:
    keys.add("clip")
  if has_teacher and cfg.alpha:
    keys |= {"affinity_i2t", "affinity_t2i", "affinity"}
  for k in ("image_image", "text_text", "embedding"):
    if getattr(cfg, k):
      keys.add(k)
  return keys


F64, F32 = (np.float64, 1e-10), (np.float32, 1e-5)
TORCH_CASES = ([(c, sc, *F64) for c in CONFIGS + ["clip_only_no_teacher"] for sc in SCALES]
               + [(c, sc, *F32) for c in (CONFIGS[-1], "clip_only_no_teacher") for sc in SCALES])


def _case_id(case):
  cfg, scales, dtype = case[:3]
  c = cfg if isinstance(cfg, str) else ",".join(
      f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
      if getattr(cfg, f.name) != f.default) or "default"
  return f"{c}-tau{scales[0]}_{scales[1]}-{np.dtype(dtype).name}"


@pytest.mark.parametrize("cfg,scales,dtype,rtol", TORCH_CASES, ids=map(_case_id, TORCH_CASES))
def test_matches_torch(cfg, scales, dtype, rtol):
  student, teacher = make_inputs(scales=scales)
  if cfg == "clip_only_no_teacher":
    cfg, teacher = LossConfig(alpha=0.0), None
  ref_total, ref_terms, ref_grads = torch_distill(student, teacher, cfg)
  with jax.enable_x64(dtype == np.float64):
    loss, terms, grads = jax_loss_and_grad(cast(student, dtype),
                                           None if teacher is None else cast(teacher, dtype), cfg,
                                           jit=False)  # eager: compiling 32 variants is slow
    assert loss.dtype == dtype
  assert set(terms) == _expected_keys(cfg, teacher is not None)
  assert_close(loss, ref_total, rtol, "total")
  for k, v in terms.items():
    assert_close(v, ref_terms[k] if k != "total" else ref_total, rtol, k)
  for k in ("image_embeds", "text_embeds", "logit_scale"):
    assert_close(grads[k], ref_grads[k], rtol, f"grad {k}")


def test_teacher_is_constant_and_bf16_computes_in_f32():
  student, teacher = make_inputs()
  cfg = CONFIGS[-1]
  g = jax.grad(lambda t: distill_loss(cast(student, np.float32), t, cfg)[0])(cast(teacher, np.float32))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))
  # bfloat16 embeddings: loss/softmax in float32, equal to the f32 loss of the rounded inputs.
  bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), (student, teacher))
  loss_bf, _ = jax.jit(lambda s, t: distill_loss(s, t, cfg))(*bf)
  rounded = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), bf)
  loss_f32, _ = distill_loss(*rounded, cfg)
  assert loss_bf.dtype == jnp.float32
  assert_close(loss_bf, loss_f32, 1e-5, "bf16")


# ---------------------------------------------------------------- sharded == global

MESHES = {
    "1d": ((8,), ("data",), "data"),
    "2d": ((4, 2), ("data", "fsdp"), ("data", "fsdp")),
    "2d_batch_on_data_only": ((4, 2), ("data", "fsdp"), "data"),  # replicated over fsdp
}


def make_mesh(name):
  shape, names, batch_axes = MESHES[name]
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names), batch_axes


SHARD_CASES = ([(m, c, np.float32, 1e-6) for m in MESHES for c in (0, 6, "clip_only_no_teacher")]
               + [("2d", 6, np.float64, 1e-12)])


@pytest.mark.parametrize("mesh_name,cfg_i,dtype,rtol", SHARD_CASES,
                         ids=[f"{m}-cfg{c}-{np.dtype(d).name}" for m, c, d, _ in SHARD_CASES])
def test_sharded_equals_global(mesh_name, cfg_i, dtype, rtol):
  mesh, batch_axes = make_mesh(mesh_name)
  student, teacher = make_inputs(seed=1, n=32, d=8, scales=(12.3, 30.0))
  if cfg_i == "clip_only_no_teacher":
    cfg, teacher = LossConfig(alpha=0.0), None
  else:
    cfg = CONFIGS[cfg_i]
  with jax.enable_x64(dtype == np.float64):
    s = cast(student, dtype)
    t = None if teacher is None else cast(teacher, dtype)
    ref_loss, ref_terms, ref_grads = jax_loss_and_grad(s, t, cfg)
    loss, terms, grads = jax_loss_and_grad(s, t, cfg, fn=sharded_distill_loss(mesh, batch_axes, cfg))
  assert set(terms) == set(ref_terms)
  assert_close(loss, ref_loss, rtol, "loss")
  for k in terms:
    assert_close(terms[k], ref_terms[k], rtol, k)
  # Embedding grads come back sharded over the batch; the learned scale replicated.
  for k in ("image_embeds", "text_embeds", "logit_scale"):
    assert_close(grads[k], ref_grads[k], rtol, f"grad {k}")


# ---------------------------------------------------------------- HLO: no BxB matrix

_BXB = re.compile(r"\b[a-z][a-z0-9]*\[64,64[\],]")   # any dtype, e.g. f32[64,64]{1,0}
_ALL_GATHER = re.compile(r"=\s*(?P<shape>[^=]*?)\s+all-gather(?:-start)?\(")


def _hlo_facts(text):
  gathered = [m.group("shape") for m in _ALL_GATHER.finditer(text)]
  return {"gathers_bxd": any("f32[64,32]" in s for s in gathered),
          "bxb": _BXB.findall(text),
          "local_block": bool(re.search(r"\bf32\[8,64\]", text))}


def _full_matrix_fn(mesh, cfg):
  """Deliberately wrong design: every device gathers and builds the full BxB."""
  def body(s, t):
    g = lambda d: {k: (v if k == "logit_scale" else jax.lax.all_gather(v, "data", tiled=True))
                   for k, v in d.items()}
    loss, _ = distill_loss(g(s), g(t), cfg)
    return jax.lax.pmean(loss, "data")
  spec = {"image_embeds": P("data"), "text_embeds": P("data"), "logit_scale": P()}
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=P())


def test_hlo_has_no_bxb_matrix():
  mesh, _ = make_mesh("1d")
  cfg = CONFIGS[-1]  # every term on
  s, t = (cast(x, np.float32) for x in make_inputs(n=64, d=32))
  fn = sharded_distill_loss(mesh, "data", cfg)
  fwd = _hlo_facts(jax.jit(fn).lower(s, t).compile().as_text())
  assert fwd["gathers_bxd"], "expected an all-gather producing f32[64,32]"
  assert fwd["bxb"] == [], f"BxB array in HLO: {fwd['bxb'][:5]}"
  assert fwd["local_block"], "expected the local f32[8,64] affinity block"
  grad_hlo = jax.jit(jax.grad(lambda s, t: fn(s, t)[0])).lower(s, t).compile().as_text()
  bwd = _hlo_facts(grad_hlo)
  assert bwd["bxb"] == [], f"BxB array in grad HLO: {bwd['bxb'][:5]}"
  assert "reduce-scatter" in grad_hlo  # transpose of the all-gather
  # The check can fail: the naive version is caught.
  bad = _hlo_facts(jax.jit(_full_matrix_fn(mesh, cfg)).lower(s, t).compile().as_text())
  assert bad["bxb"], "regex failed to detect the BxB matrix in the naive version"


# ---------------------------------------------------------------- bad input

def test_bad_inputs():
  student, teacher = make_inputs()
  with pytest.raises(ValueError, match=r"teacher is None.*alpha=1.0"):
    distill_loss(student, None, LossConfig(alpha=1.0))
  with pytest.raises(ValueError, match=r"teacher is None.*alpha=0.5"):
    distill_loss(student, None, LossConfig(alpha=0.5))
  with pytest.raises(ValueError, match=r"teacher is None.*image_image"):
    distill_loss(student, None, LossConfig(alpha=0.0, image_image=1.0))
  s, t = make_inputs(d=8, d_teacher=16)
  with pytest.raises(ValueError, match=r"student image_embeds has dim 8, teacher has dim 16"):
    distill_loss(s, t, LossConfig(embedding=1.0))
  distill_loss(s, t, LossConfig())  # dims may differ when embedding distillation is off
  with pytest.raises(ValueError, match="alpha"):
    LossConfig(alpha=1.5)
