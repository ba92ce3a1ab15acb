"""Gradient caching (microbatch_size) equals the one-shot step exactly.

Reference: the one-shot gradient of the same loss (itself checked against PyTorch in
test_losses.py / test_convert_maps.py). Tolerance (float32, highest matmul precision): every loss term within 1e-6 of the loss;
the whole gradient within 1e-6 relative in norm (‖g_micro − g‖₂ ≤ 1e-6·‖g‖₂), and
every leaf within 4e-6. Only float32 rounding differs: XLA's matmuls round an example
differently inside a batch of 8 than alone (loss terms move by ~4e-7), and a few bias
leaves that sum hundreds of token rows amplify that to 2.9e-6 (measured worst, with
attention through jax.nn.dot_product_attention; 2.2e-6 with the former hand-written
attention).
"""
import json
import os
import sys

import jax
import numpy as np
import pytest

from tinyclip_jax import parallel
from tinyclip_jax.models import CLIP
from tinyclip_jax.train import compile as compile_lib, loop, prepare, runner
from tinyclip_jax.train.step import LossSettings, make_grad_fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import smoke  # noqa: E402

# Each test builds the smoke teacher and student again: the module's compilation cache
# (tests/compile_cache.py) compiles their initialisation once.
pytestmark = [pytest.mark.xdist_group("microbatch"), pytest.mark.usefixtures("compile_cache")]

LOSSES = {
    "affinity": {},
    "affinity+clip, learned scale": {"alpha": 0.5, "learn_scale": True, "student_scale": 20.0},
    "all terms": {"alpha": 0.7, "image_image": 0.3, "text_text": 0.2, "embedding": 0.5},
    "clip only": {"alpha": 0.0},
}


def _config(batch, mesh, **loss):
  c = smoke.get_config()
  c.batch_size = batch
  c.mesh.update(mesh)
  c.loss.update(loss)
  return c


def _batch(c, setup):
  rng = np.random.default_rng(0)
  abstract = compile_lib.batch_abstract(c, setup.student_config, setup.mesh)
  tokens = rng.integers(1, 49000, abstract["tokens"].shape).astype(np.int32)
  tokens[np.arange(len(tokens)), rng.integers(3, tokens.shape[1], len(tokens))] = 49407
  host = {"images": rng.standard_normal(abstract["images"].shape, np.float32), "tokens": tokens}
  return {k: jax.device_put(v, abstract[k].sharding) for k, v in host.items()}


def _grads(c, setup, state, batch, micro):
  teacher = CLIP(setup.teacher_config) if c.loss.alpha > 0 else None
  fn = jax.jit(make_grad_fn(CLIP(setup.student_config), teacher, LossSettings.from_config(c.loss), setup.mesh,
                            c.batch_size, micro))
  return jax.device_get(fn(state.params, setup.teacher_params, batch))


# float32 rounding of the same sums taken in another order, amplified through the
# towers' backward pass: measured up to 1.6e-6 of the gradient's norm (1.0e-6 on
# another CPU); a wrong gradient is off by orders of magnitude more.
def _assert_same(one_shot, cached, rel=2.5e-6):
  (l0, t0), g0 = one_shot
  (l1, t1), g1 = cached
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for k in t0:
    # a term near 0 (T2T at τ=50 here is ~1e-4) is judged on the scale of the loss
    np.testing.assert_allclose(t1[k], t0[k], rtol=1e-6, atol=1e-6 * abs(float(l0)), err_msg=k)
  num = den = 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d, n = np.sum((a64 - b64) ** 2), np.sum(a64 ** 2)
    assert d <= (4e-6) ** 2 * n, (jax.tree_util.keystr(path), np.sqrt(d / n))
    num, den = num + d, den + n
  assert 0 < num <= rel ** 2 * den, np.sqrt(num / den)  # > 0: really different sums


ONE_DEVICE = ({"data": 1, "fsdp": 1, "tensor": 1}, 8, (1, 2))
EIGHT_DEVICES = ({"data": 4, "fsdp": 2, "tensor": 1}, 16, (1,))  # 2 rows each


# Every loss on the sharded mesh (where the loss all-gathers); the one-device mesh with
# two microbatch sizes on the loss with every term (the suite's time is counted).
@pytest.mark.parametrize("name,mesh,batch,micros",
                         [(name, *EIGHT_DEVICES) for name in sorted(LOSSES)] +
                         [("all terms", *ONE_DEVICE)])
def test_microbatched_gradients_equal_one_shot(name, mesh, batch, micros, monkeypatch):
  if mesh["data"] == 1:  # a one-device mesh inside the 8-device test process
    real = parallel.make_mesh
    monkeypatch.setattr(parallel, "make_mesh", lambda s, d=None: real(s, jax.devices()[:1]))
  c = _config(batch, mesh, **LOSSES[name])
  setup, state = prepare.build(c, restoring=False)
  batch_arrays = _batch(c, setup)
  reference = _grads(c, setup, state, batch_arrays, 0)
  for micro in micros:
    _assert_same(reference, _grads(c, setup, state, batch_arrays, micro))


def test_smoke_run_logs_the_same_losses(tmp_path):
  runs = {}
  for micro in (0, 1):
    c = smoke.get_config()
    c.total_steps, c.log_every, c.eval.tasks = 3, 1, ""
    c.microbatch_size = micro
    runner.run(c, str(tmp_path / f"m{micro}"))
    lines = [json.loads(x) for x in open(tmp_path / f"m{micro}" / "metrics.jsonl")]
    runs[micro] = [x["loss"] for x in lines if "loss" in x]
  assert len(runs[0]) == 3
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)


@pytest.mark.parametrize("micro", [3, 32, -1])
def test_bad_microbatch_size_is_one_sentence_before_compiling(micro):
  c = _config(16, {"data": -1, "fsdp": 1, "tensor": 1})
  c.microbatch_size = micro
  with pytest.raises(prepare.SetupError, match=f"microbatch_size {micro} does not divide the "
                     "per-device batch 2"):
    prepare.build(c, restoring=False)


def test_composes_with_bfloat16_and_remat_in_one_loop(monkeypatch):
  """bf16 compute + remat + microbatches: close to the one-shot bf16 step (bf16
  rounding, 2e-2), and the microbatch loop is a single while loop in the program, so
  compile time does not grow with the number of microbatches."""
  real = parallel.make_mesh
  monkeypatch.setattr(parallel, "make_mesh", lambda s, d=None: real(s, jax.devices()[:1]))
  c = _config(8, {"data": 1, "fsdp": 1, "tensor": 1})
  c.precision, c.remat = "bfloat16", True
  setup, state = prepare.build(c, restoring=False)
  batch = _batch(c, setup)
  student = CLIP(setup.student_config, remat=True, dtype=setup.dtype)
  teacher = CLIP(setup.teacher_config, dtype=setup.dtype)
  texts = {}
  results = {}
  for micro in (0, 1, 2):
    fn = jax.jit(make_grad_fn(student, teacher, LossSettings.from_config(c.loss), setup.mesh, c.batch_size, micro))
    lowered = fn.lower(state.params, setup.teacher_params, batch)
    texts[micro] = lowered.as_text()
    results[micro] = jax.device_get(lowered.compile()(state.params, setup.teacher_params, batch))
  (l0, _), g0 = results[0]
  for micro in (1, 2):
    (l1, _), g1 = results[micro]
    np.testing.assert_allclose(l1, l0, rtol=2e-2)
    n0 = np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(g0)))
    d = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1))))
    assert d <= 5e-2 * n0, d / n0
  # 8 microbatches and 4 lower to programs of the same size: the loop is not unrolled.
  assert texts[1].count("stablehlo.while") == texts[2].count("stablehlo.while") == 2
  assert abs(len(texts[1]) - len(texts[2])) < 0.02 * len(texts[1])


def test_masked_gradients_with_microbatches_equal_one_shot(monkeypatch):
  """With structure masks the gradient w.r.t. (params, log α) is cached the same way:
  the gates are sampled once per step and shared by every microbatch and both passes."""
  from tinyclip_jax.inherit import masks  # pylint: disable=import-outside-toplevel
  c = _config(8, {"data": 1, "fsdp": 1, "tensor": 1})
  real = parallel.make_mesh
  monkeypatch.setattr(parallel, "make_mesh", lambda s, d=None: real(s, jax.devices()[:1]))
  setup, state = prepare.build(c, restoring=False)
  batch = _batch(c, setup)
  valid = masks.model_valid(setup.student_config, ("visual", "text"),
                            ("hidden", "heads", "intermediate", "layer"))
  rng = np.random.default_rng(1)
  logas = jax.tree.map(lambda v: jax.numpy.asarray(rng.uniform(-2, 4, v.shape), np.float32), valid)
  noise = masks.uniform_noise(jax.random.key(3), logas)
  gates_of = lambda l: masks.training_gates(l, valid, noise)  # noqa: E731
  teacher = CLIP(setup.teacher_config)
  out = []
  for micro in (0, 2):
    fn = make_grad_fn(CLIP(setup.student_config), teacher, LossSettings.from_config(c.loss), setup.mesh, c.batch_size, micro)
    out.append(jax.device_get(jax.jit(lambda tr, tp, b, fn=fn: fn(tr, tp, b, gates_of))(
        (state.params, logas), setup.teacher_params, batch)))
  _assert_same(*out, rel=2e-6)  # gated rows: measured 1.04e-6
  assert float(np.abs(out[0][1][1]["visual"]["heads"]).max()) > 0  # log α gets a gradient
