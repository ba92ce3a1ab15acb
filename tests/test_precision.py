"""The accelerator-ready step, checked on CPU: the mixed-precision policy (read from the
step's jaxpr), attention through jax.nn.dot_product_attention against the softmax
attention written here in numpy, scanned layers against the unrolled towers, and the
pre-flight memory check.

Tolerances: attention in float32 within 1e-5 of float64 numpy (outputs of magnitude
~5); in bfloat16 within 2e-2 of the largest output, both of float64 numpy and of the
former hand-written attention run in bf16 (bf16 keeps 8 bits of mantissa, ~4e-3 per
rounding, and inputs, q/k/v, probabilities and outputs each round); scanned ==
unrolled within 1e-6 relative (norm over the whole tree; each tensor within 1e-5 of
its own largest value), values and gradients: XLA fuses the scan body differently,
so float rounding differs (measured ≤ 2e-6 per tensor). The HF CLIPModel parity at
1e-5 (test_convert_maps.py) runs through the same dot_product_attention path.
"""
from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyclip_jax import models
from tinyclip_jax.inherit import masks
from tinyclip_jax.models import CLIP, CLIPConfig, text_tower, vision_tower
from tinyclip_jax.models.layers import Attention, layer_runs
from tinyclip_jax.models.precision import policy_for
from tinyclip_jax.train import compile as compile_lib, defaults, preflight, prepare
from tinyclip_jax.train.step import make_grad_fn, make_train_step


# ------------------------------------------------------------------------------ policy


@pytest.mark.parametrize("precision, platform, dtype, attention", [
    ("auto", "cpu", jnp.float32, None),
    ("auto", "gpu", jnp.bfloat16, "cudnn"),
    ("auto", "tpu", jnp.bfloat16, None),
    ("float32", "gpu", jnp.float32, None),
    ("bfloat16", "cpu", jnp.bfloat16, None),
])
def test_policy_by_platform(precision, platform, dtype, attention):
  p = policy_for(precision, platform)
  assert (p.compute_dtype, p.teacher_dtype, p.attention) == (dtype, dtype, attention)
  assert p.param_dtype == jnp.float32 and p.output_dtype == jnp.float32
  assert p.student_kw == dict(dtype=dtype, param_dtype=jnp.float32, attention=attention)


def test_unknown_precision_names_the_choices():
  with pytest.raises(ValueError, match="'float16'.*'auto', 'float32' or 'bfloat16'"):
    policy_for("float16", "cpu")
  assert defaults.base_config().precision == "auto"


# --------------------------------------------------------------------------- attention


def numpy_attention(params, x, heads, head_dim, causal, query_index=None, gate=None):
  """Multi-head softmax attention in float64: q scaled by 1/sqrt(d), -inf above the
  diagonal when causal, head gates before the output projection."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  qkv = np.einsum("bnw,wthd->tbhnd", x, p["in_proj_kernel"]) + p["in_proj_bias"][:, None, :,
                                                                                  None]
  q, k, v = qkv[0] / np.sqrt(head_dim), qkv[1], qkv[2]
  logits = q @ k.transpose(0, 1, 3, 2)
  n = x.shape[1]
  if causal:
    logits = logits + np.triu(np.full((n, n), -np.inf), 1)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = probs @ v
  if gate is not None:
    out = out * np.asarray(gate, np.float64)[None, :, None, None]
  out = np.einsum("bhnd,hdw->bnw", out, p["out_proj_kernel"]) + p["out_proj_bias"]
  return out if query_index is None else out[np.arange(x.shape[0]), query_index]


def old_attention(p, x, heads, head_dim, causal, query_index, gate, dtype):
  """The hand-written attention tinyclip_jax ran before dot_product_attention, in jnp:
  (b, h, n, d) layout, q scaled first in the compute dtype, float32 softmax."""
  b, n, width = x.shape
  x = jnp.asarray(x, dtype)
  qkv = x.reshape(-1, width) @ p["in_proj_kernel"].astype(dtype).reshape(width, -1)
  qkv = (qkv + p["in_proj_bias"].astype(dtype).reshape(-1)).reshape(b, n, 3, heads, head_dim)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)
  q = q * jnp.asarray(1 / np.sqrt(head_dim), dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  if causal:
    logits = jnp.where(np.tril(np.ones((n, n), bool)), logits, -jnp.inf)
  out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, -1).astype(dtype), v)
  if gate is not None:
    out = out * jnp.asarray(gate, dtype)[None, :, None, None]
  out = out.transpose(0, 2, 1, 3).reshape(b * n, heads * head_dim)
  out = out @ p["out_proj_kernel"].astype(dtype).reshape(heads * head_dim, width)
  out = (out + p["out_proj_bias"].astype(dtype)).reshape(b, n, width)
  return out if query_index is None else out[np.arange(b), query_index]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal, pooled, gated", [
    (False, False, False), (True, False, False), (True, True, True), (False, True, False),
    (False, False, True)], ids=["full", "causal", "causal-pooled-gated", "pooled", "gated"])
def test_attention_matches_softmax_attention(dtype, causal, pooled, gated):
  b, n, width, heads, d = 3, 7, 32, 2, 16
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, n, width)).astype(np.float32)
  query_index = np.array([6, 2, 0], np.int32) if pooled else None
  gate = np.array([0.3, 1.0], np.float32) if gated else None
  attn = Attention(heads, d, causal, 0.3, 0.3, dtype=dtype)
  params = attn.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
                        models.clip.nn.meta.unbox(params))  # nonzero biases
  got = attn.apply({"params": params}, x, query_index, gate)
  assert got.dtype == dtype
  got = np.asarray(got, np.float64)
  want = numpy_attention(params, x, heads, d, causal, query_index, gate)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  else:  # bf16 (measured ≤ 1.1e-2 of the largest output, old and new alike)
    old = np.asarray(old_attention(params, x, heads, d, causal, query_index, gate, dtype),
                     np.float64)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-2 * scale
    assert np.abs(got - old).max() <= 2e-2 * scale
  # "cudnn" where there is no cuDNN (this CPU) is the same XLA computation.
  fallback = Attention(heads, d, causal, 0.3, 0.3, dtype=dtype, implementation="cudnn")
  np.testing.assert_array_equal(
      np.asarray(fallback.apply({"params": params}, x, query_index, gate), np.float64), got)


def test_unknown_attention_implementation_is_an_error():
  attn = Attention(1, 8, False, 0.1, 0.1, implementation="flash")
  with pytest.raises(ValueError, match="'flash' is unknown; use None, 'xla' or 'cudnn'"):
    attn.init(jax.random.key(0), np.zeros((1, 3, 8), np.float32))


# --------------------------------------------------------------------- scanned layers


def test_layer_runs_group_identical_consecutive_layers():
  assert layer_runs((2, 2, 2, 2), (8, 8, 8, 8), True) == [(0, 3), (3, 4)]
  assert layer_runs((2, 2, 2, 2), (8, 8, 8, 8), False) == [(0, 4)]
  assert layer_runs((2, 2, 1, 1, 1, 0), (8, 8, 8, 8, 8, 8), True) == [(0, 2), (2, 5), (5, 6)]
  assert layer_runs((2, 2, 2), (8, 4, 8), True) == [(0, 1), (1, 2), (2, 3)]
  assert layer_runs((), (), True) == []


def model_inputs(cfg, b=3):
  rng = np.random.default_rng(0)
  img = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
  tok = rng.integers(1, cfg.text.vocab_size - 1, (b, cfg.text.context_length)).astype(np.int32)
  tok[:, [5, 9, 15]] = cfg.text.vocab_size - 1
  return img, tok


def assert_close(a, b, rel=1e-6, per_tensor=1e-5):
  """‖a − b‖ ≤ rel·‖a‖ over the whole tree, and each tensor within per_tensor of its
  own largest value (a layer computed wrongly would show here)."""
  a, b = (jax.tree.map(lambda x: np.asarray(x, np.float64), t) for t in (a, b))
  diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b))))
  norm = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(a)))
  assert diff <= rel * norm, diff / norm

  def check(path, x, y):
    scale = max(np.abs(x).max(), 1e-30)
    assert np.abs(x - y).max() <= per_tensor * scale, (jax.tree_util.keystr(path),
                                                       np.abs(x - y).max() / scale)
  jax.tree_util.tree_map_with_path(check, a, b)


def test_scanned_layers_equal_the_unrolled_towers():
  """A uniform image tower (one scanned run + the pooled last layer) and a text tower
  of per-layer widths (two runs of 2, one without its MLP), with remat and structure
  gates: values and gradients (parameters and gates)."""
  cfg = CLIPConfig(24, vision_tower(64, 3, 8, image_size=32, heads=2, mlp=128, head_dim=32),
                   text_tower(64, 5, heads=(2, 2, 1, 1, 2), mlp=(96, 96, 0, 0, 64),
                              head_dim=32, context_length=16, vocab_size=100))
  shapes = models.param_shapes(cfg)
  # Initialization keeps the stored per-layer layout.
  assert models.param_shapes(cfg, scan_layers=True) == shapes
  rng = np.random.default_rng(1)  # random weights (numpy: nothing to compile)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[0] if s.ndim > 1
                                                                      else 4)).astype(np.float32),
                        shapes)
  img, tok = model_inputs(cfg)
  valid = masks.model_valid(cfg, ("visual", "text"), ("hidden", "heads", "intermediate",
                                                        "layer"))
  # Gates as training samples them: soft values, exact zeros (some closed), 0 where padded.
  gates = jax.tree.map(lambda v: np.where(v & (rng.uniform(size=v.shape) > 0.2),
                                          rng.uniform(0.2, 1.0, v.shape), 0.0).astype(np.float32),
                       valid)

  def loss(p, g, scan):
    out = CLIP(cfg, remat=True, scan_layers=scan).apply({"params": p}, img, tok, gates=g)
    return jnp.sum(out["image_embeds"] @ out["text_embeds"].T * jnp.arange(1.0, 4.0))

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  (l0, (g0, gg0)), (l1, (g1, gg1)) = grad_fn(params, gates, False), grad_fn(params, gates, True)
  assert_close((l0, g0), (l1, g1))
  assert_close(gg0, gg1)
  text = str(jax.make_jaxpr(lambda p: loss(p, gates, True))(params))
  assert text.count("scan[") >= 3  # the runs really are scans (not a silent unroll)


# ------------------------------------------------------------------- policy in the step


def smoke_config(precision: str):
  c = defaults.base_config()
  c.teacher.model = c.student.model = ""
  tiny = dict(embed_dim=16, image_size=16, patch_size=8, text_heads=0, head_dim=16,
              context_length=8, vocab_size=64, activation="gelu")
  c.teacher.custom.update(tiny, vision_width=48, vision_layers=2, text_width=48, text_layers=2)
  c.student.custom.update(tiny, vision_width=32, vision_layers=2, text_width=32, text_layers=2)
  c.batch_size, c.total_steps, c.precision = 8, 10, precision
  c.mesh.data = 1
  return c


def step_parts(precision: str):
  """(config, setup, student, teacher, batch) of the tiny config on one device."""
  from tinyclip_jax import parallel  # pylint: disable=import-outside-toplevel
  make_mesh = parallel.make_mesh
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", lambda sizes, _=None: make_mesh(sizes, jax.devices()[:1]))
    config = smoke_config(precision)
    setup, _ = prepare.build(config, restoring=True)
  student, teacher = compile_lib.step_models(config, setup)
  batch = compile_lib.batch_abstract(config, setup.student_config, setup.mesh)
  return config, setup, student, teacher, batch


@pytest.fixture(scope="module")
def auto_parts():
  return step_parts("auto")


@pytest.fixture(scope="module")
def bf16_parts(auto_parts):
  """The same setup with the bfloat16 policy (what prepare.build picks for
  precision="bfloat16", see test_policy_by_platform)."""
  config, setup = auto_parts[0].copy_and_resolve_references(), auto_parts[1]
  config.precision = "bfloat16"
  setup = dataclasses.replace(setup, policy=policy_for("bfloat16", "cpu"))
  student, teacher = compile_lib.step_models(config, setup)
  return config, setup, student, teacher, auto_parts[4]


def dot_generals(jaxpr):
  """Every dot_general of a jaxpr, nested ones (scan, shard_map, pjit, vjp) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from dot_generals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from dot_generals(sub)


def test_bfloat16_policy_of_the_train_step(bf16_parts):
  config, setup, student, teacher, batch = bf16_parts
  assert (student.dtype, teacher.dtype) == (jnp.bfloat16, jnp.bfloat16)
  # Parameters and optimizer state stay float32.
  floats = [x.dtype for x in jax.tree.leaves(setup.abstract_state)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  step = make_train_step(student, teacher, setup.loss, setup.mesh, setup.tx, setup.lr_fn,
                         config.batch_size)
  new_state, metrics = jax.eval_shape(step, setup.abstract_state, setup.teacher_params, batch)
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype,
                                                                    setup.abstract_state)
  assert metrics["loss"].dtype == jnp.float32
  # Every matmul of the towers (student and teacher, forward and backward) takes bf16
  # (attention's backward multiplies float32 logit gradients by bf16 keys under jax's
  # BF16_BF16_F32 algorithm); only the affinity logits (B × embed_dim rows against each
  # other) and their gradients are float32 matmuls.
  jaxpr = jax.make_jaxpr(step)(setup.abstract_state, setup.teacher_params, batch).jaxpr
  kinds = {"bf16": 0, "f32": 0, "teacher_bf16": 0}
  for eqn in dot_generals(jaxpr):
    a, b = (v.aval for v in eqn.invars)
    if jnp.bfloat16 in (a.dtype, b.dtype):
      kinds["bf16"] += 1
      kinds["teacher_bf16"] += 48 in a.shape + b.shape  # the teacher's width
    else:
      assert a.dtype == b.dtype == jnp.float32, (a, b)
      assert a.ndim == b.ndim == 2 and set(a.shape + b.shape) <= {8, 16}, (a, b)
      kinds["f32"] += 1
  assert kinds["bf16"] > 30 and kinds["teacher_bf16"] > 5 and kinds["f32"] >= 4, kinds


def test_teacher_runs_under_stop_gradient(bf16_parts):
  config, setup, student, teacher, _ = bf16_parts
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                        models.param_shapes(setup.student_config))
  batch = {"images": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
           "tokens": rng.integers(1, 64, (8, 8)).astype(np.int32)}
  grad_fn = make_grad_fn(student, teacher, setup.loss, setup.mesh, 8)
  loss = jax.jit(lambda tp: grad_fn(params, tp, batch)[0][0])
  g = jax.jit(jax.grad(loss))(setup.teacher_params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))
  # ... while the loss does depend on the teacher's weights.
  assert float(loss(setup.teacher_params)) != float(
      loss(jax.tree.map(lambda x: x * 1.5, setup.teacher_params)))


def test_auto_is_float32_on_cpu(auto_parts):
  config, setup, student, teacher, batch = auto_parts
  assert setup.policy.compute_dtype == student.dtype == teacher.dtype == jnp.float32
  step = make_train_step(student, teacher, setup.loss, setup.mesh, setup.tx, setup.lr_fn,
                         config.batch_size)
  jaxpr = jax.make_jaxpr(step)(setup.abstract_state, setup.teacher_params, batch).jaxpr
  assert "bf16" not in str(jaxpr)


# ---------------------------------------------------------------------------- preflight


class FakeCompiled:
  def __init__(self, arguments, outputs, temp, alias):
    self.mem = types.SimpleNamespace(argument_size_in_bytes=arguments,
                                     output_size_in_bytes=outputs, temp_size_in_bytes=temp,
                                     alias_size_in_bytes=alias)

  def memory_analysis(self):
    return self.mem


class FakeDevice:
  def __init__(self, limit, kind="Fake H200"):
    self.limit, self.device_kind = limit, kind

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


GIB = 2 ** 30


def test_preflight_passes_a_step_that_fits_and_skips_cpu():
  fits = FakeCompiled(10 * GIB, 10 * GIB, 50 * GIB, 10 * GIB)  # 60 GiB
  preflight.check_memory(fits, [FakeDevice(64 * GIB)] * 2, per_device_batch=256)
  preflight.check_memory(fits, [FakeDevice(None)], per_device_batch=256)  # CPU: no limit


def test_preflight_refuses_with_a_microbatch_that_fits():
  # 40 GiB fixed + 120 GiB of temporaries for 256 rows on 100 GiB devices: 60 GiB of room,
  # so 256 * 60 / 120 = 128 rows, the largest divisor of 256 that fits.
  big = FakeCompiled(50 * GIB, 30 * GIB, 120 * GIB, 40 * GIB)
  devices = [FakeDevice(120 * GIB), FakeDevice(100 * GIB)]  # the smallest one counts
  with pytest.raises(prepare.SetupError) as e:
    preflight.check_memory(big, devices, per_device_batch=256)
  msg = str(e.value)
  assert msg.count(". ") == 0 and msg.endswith(".")
  for words in ("needs 160.0 GiB per device", "Fake H200 has 100.0 GiB", "microbatch_size=128",
                "remat=True"):
    assert words in msg, msg
  # With remat on and microbatches of 64 already: 64 * 60 / 120 = 32.
  with pytest.raises(prepare.SetupError, match="microbatch_size=32 would fit") as e:
    preflight.check_memory(big, devices, per_device_batch=256, microbatch_size=64, remat=True)
  assert "remat" not in str(e.value)


def test_preflight_refuses_when_the_state_alone_does_not_fit():
  huge = FakeCompiled(150 * GIB, 100 * GIB, 1 * GIB, 100 * GIB)
  with pytest.raises(prepare.SetupError, match=r"needs 151\.0 GiB.*alone take 150\.0 GiB.*"
                                               r"mesh\.fsdp.*teacher\.cache"):
    preflight.check_memory(huge, [FakeDevice(100 * GIB)], per_device_batch=256)


def test_preflight_reads_a_real_compiled_step():
  """The attribute names of a real executable's memory analysis (CPU reports one)."""
  compiled = jax.jit(lambda x: (x @ x.T).sum(0)).lower(np.ones((64, 32), np.float32)).compile()
  need = preflight.step_bytes(compiled)
  mem = compiled.memory_analysis()
  assert need["fixed"] == (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           - mem.alias_size_in_bytes) >= 64 * 32 * 4
  with pytest.raises(prepare.SetupError, match="per device but each Tiny has"):
    preflight.check_memory(compiled, [FakeDevice(1024, "Tiny")], per_device_batch=1)


def test_the_loop_checks_memory_after_compiling(auto_parts, monkeypatch):
  """compile.compile_train_steps runs the check on each step it compiled, against the
  mesh's devices; each of those 8 rows per device takes 1 GiB here."""
  config, setup, *_ = auto_parts
  monkeypatch.setattr(preflight, "device_limit", lambda devices: (
      10 * GIB if list(devices) == list(setup.mesh.devices.flat) else None, "Fake GPU"))
  with pytest.raises(prepare.SetupError, match="needs 12.0 GiB per device but each Fake GPU "
                                               "has 10.0 GiB; microbatch_size=4 would fit"):
    _compile_as(FakeCompiled(4 * GIB, 0, 8 * GIB, 0), config, setup, monkeypatch)
  _compile_as(FakeCompiled(4 * GIB, 0, 6 * GIB, 0), config, setup, monkeypatch)  # fits


def _compile_as(fake, config, setup, monkeypatch):
  """compile_train_steps with XLA's compile replaced by `fake` (its memory account)."""
  class Jitted:
    def lower(self, *args):
      return types.SimpleNamespace(compile=lambda: fake)
  monkeypatch.setattr(compile_lib, "train_step", lambda *a, **k: Jitted())
  monkeypatch.setattr(compile_lib, "log_compiled", lambda *a: None)
  return compile_lib.compile_train_steps(config, setup, {8: {}})
