"""Teacher ensembles (config.teacher.ensemble): the targets are the mean of the
teachers' softmax distributions, per direction (MobileCLIP's rule).

References: the rule spelled with torch ops in this file (float64). Tolerances:
  * JAX float64 vs torch float64: 1e-10 of the largest term (measured ~2e-16).
  * the 8-device sharded loss in float32 vs torch float64: 1e-6 (measured ~5e-8).
  * a one-teacher list vs today's dict form: exactly equal (==), loss, terms,
    gradients, and the parameters after one train step.
  * the end-to-end run's first logged loss vs the rule applied to embeddings the test
    computes itself (another float32 program): 2e-6 relative (measured 3e-9 one-shot,
    2e-7 microbatched; 2e-8 for the step fed two teachers' cached embeddings).
"""
from __future__ import annotations

import copy
import dataclasses
import time

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh

from tinyclip_jax import metrics as metrics_lib, parallel
from tinyclip_jax.losses import LossConfig, distill_loss, sharded_distill_loss
from tinyclip_jax.models import CLIP
from tinyclip_jax.train import checks, compile as compile_lib, defaults, plan, prepare, runner
from tinyclip_jax.train import teacher as teacher_lib
from tinyclip_jax.train.step import LossSettings, make_train_step

from test_train import CompileCounter, assert_one_sentence, mesh_on, run_main, smoke_config

# The runs build the smoke teacher and student again: the module's compilation cache
# (tests/compile_cache.py) compiles their initialisation once.
pytestmark = [pytest.mark.xdist_group("ensemble"), pytest.mark.usefixtures("compile_cache")]

B, D_S, D_T = 16, 8, (8, 12)  # batch; student width; the two teachers' widths
CONFIGS = [LossConfig(), LossConfig(alpha=0.5, distill_weight=1.5, image_image=0.4,
                                    text_text=0.6)]


def _normed(rng, n, d, spread=0.5):
  # A shared direction + noise: cosines are high, so the softmaxes are not one-hot.
  x = rng.normal(size=(1, d)) + spread * rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed=0, n=B, scales=(20.0, 50.0, 35.0)):
  """A student and two teachers of different widths, each with its own scale."""
  rng = np.random.default_rng(seed)
  def embeds(d, tau):
    return {"image_embeds": _normed(rng, n, d), "text_embeds": _normed(rng, n, d),
            "logit_scale": np.float64(tau)}
  return embeds(D_S, scales[0]), [embeds(d, tau) for d, tau in zip(D_T, scales[1:])]


def cast(tree, dtype):
  return jax.tree.map(lambda x: np.asarray(x, dtype), tree)


# ---------------------------------------------------------------- the rule, in torch

def torch_ensemble(student, teachers, cfg: LossConfig) -> dict[str, float]:
  """The ensemble loss spelled with torch ops (float64): per direction, the target is
  the mean over teachers of softmax(τ_t · rows_t @ cols_t.T)."""
  t = lambda x: torch.tensor(np.asarray(x, np.float64), dtype=torch.float64)  # noqa: E731
  i_s, t_s, tau_s = (t(student[k]) for k in ("image_embeds", "text_embeds", "logit_scale"))
  members = [(t(m["image_embeds"]), t(m["text_embeds"]), t(m["logit_scale"])) for m in teachers]

  def target(rows, cols):  # indices into (image, text)
    probs = [torch.softmax(tau * (e[rows] @ e[cols].T), dim=-1)
             for e, tau in ((m[:2], m[2]) for m in members)]
    return torch.stack(probs).mean(0)

  def soft_ce(student_logits, p):
    return -(p * torch.log_softmax(student_logits, -1)).sum(-1).mean()

  terms = {"affinity_i2t": soft_ce(tau_s * i_s @ t_s.T, target(0, 1)),
           "affinity_t2i": soft_ce(tau_s * t_s @ i_s.T, target(1, 0)),
           "image_image": soft_ce(tau_s * i_s @ i_s.T, target(0, 0)),
           "text_text": soft_ce(tau_s * t_s @ t_s.T, target(1, 1))}
  terms["affinity"] = 0.5 * (terms["affinity_i2t"] + terms["affinity_t2i"])
  labels = torch.arange(i_s.shape[0])
  logits = tau_s * i_s @ t_s.T
  terms["clip"] = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
  w = cfg.distill_weight
  terms["total"] = (cfg.alpha * w * terms["affinity"] + (1 - cfg.alpha) * w * terms["clip"]
                    + cfg.image_image * terms["image_image"] + cfg.text_text * terms["text_text"])
  return {k: v.item() for k, v in terms.items()}


def assert_terms(terms, ref, rtol):
  assert terms, "no terms"
  scale = max(abs(v) for v in ref.values())
  for k, v in terms.items():
    assert abs(float(v) - ref[k]) <= rtol * scale, (k, float(v), ref[k])


@pytest.mark.parametrize("cfg", CONFIGS, ids=["affinity", "all-terms"])
def test_ensemble_loss_matches_torch(cfg):
  student, teachers = make_inputs()
  with jax.enable_x64(True):
    _, terms = jax.jit(lambda s, t: distill_loss(s, t, cfg))(cast(student, np.float64),
                                                             cast(teachers, np.float64))
  ref = torch_ensemble(student, teachers, cfg)
  assert_terms(terms, ref, 1e-10)
  # The second teacher matters: the rule with the first alone is far off.
  alone = torch_ensemble(student, teachers[:1], cfg)
  assert abs(alone["total"] - ref["total"]) > 1e-3 * abs(ref["total"])


@pytest.mark.parametrize("axes", [("data",), ("data", "fsdp")], ids=["1d", "2d"])
def test_sharded_ensemble_matches_torch(axes):
  """8 devices, each building its own rows of every teacher's affinities."""
  shape = (8,) if len(axes) == 1 else (4, 2)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), axes)
  student, teachers = make_inputs(seed=1, n=32)
  cfg = CONFIGS[1]
  _, terms = jax.jit(sharded_distill_loss(mesh, axes, cfg))(cast(student, np.float32),
                                                            cast(teachers, np.float32))
  assert_terms(terms, torch_ensemble(student, teachers, cfg), 1e-6)


ONE_TEACHER_CONFIGS = CONFIGS + [LossConfig(alpha=0.5, embedding=0.3)]


@pytest.mark.parametrize("cfg", ONE_TEACHER_CONFIGS, ids=["affinity", "all-terms", "embedding"])
def test_one_teacher_list_equals_todays_loss_exactly(cfg):
  student, teachers = make_inputs(seed=2, n=32)
  s, t = cast(student, np.float32), cast(teachers[0], np.float32)
  t = dict(t, image_embeds=t["image_embeds"][:, :D_S], text_embeds=t["text_embeds"][:, :D_S])
  grad = lambda fn: jax.jit(jax.value_and_grad(fn, has_aux=True))  # noqa: E731
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  for loss in (lambda s, t: distill_loss(s, t, cfg), sharded_distill_loss(mesh, "data", cfg)):
    (l0, t0), g0 = grad(lambda s_: loss(s_, t))(s)
    (l1, t1), g1 = grad(lambda s_: loss(s_, [t]))(s)
    assert float(l0) == float(l1)
    assert t0.keys() == t1.keys()
    for k in t0:
      assert float(t0[k]) == float(t1[k]), k
    jax.tree.map(np.testing.assert_array_equal, g0, g1)


def test_embedding_term_with_two_teachers_is_refused():
  student, teachers = make_inputs()
  with pytest.raises(ValueError, match="embedding distillation needs one teacher"):
    distill_loss(student, teachers, LossConfig(embedding=0.1))


# ---------------------------------------------------------------- the train step

# One layer per tower (the smoke models have 4 and 2): the same code, compiled faster.
SHALLOW = {f"{who}.custom.{tower}_layers": 1 for who in ("teacher", "student")
           for tower in ("vision", "text")}


def _one_step(c, setup, state, teacher, teacher_params, batch):
  step = make_train_step(CLIP(setup.student_config), teacher, setup.loss, setup.mesh, setup.tx,
                         setup.lr_fn, c.batch_size, c.microbatch_size)
  state = jax.tree.map(jnp.copy, state)  # the step donates its state
  new, metrics = jax.jit(step)(state, teacher_params, batch)
  return jax.device_get(new.params), float(metrics["loss"])


def _batch(c, setup, rng):
  abstract = compile_lib.batch_abstract(c, setup.student_config, setup.mesh)
  tokens = rng.integers(1, 49000, abstract["tokens"].shape).astype(np.int32)
  tokens[np.arange(len(tokens)), rng.integers(3, tokens.shape[1], len(tokens))] = 49407
  host = {"images": rng.standard_normal(abstract["images"].shape, np.float32), "tokens": tokens}
  return {k: jax.device_put(v, abstract[k].sharding) for k, v in host.items()}


@pytest.fixture(scope="module")
def shallow():
  """(config, setup, initial state, batch) of a one-device, one-layer smoke run."""
  with pytest.MonkeyPatch.context() as mp:
    mesh_on(mp, jax.devices()[:1])
    c = smoke_config({"batch_size": 4, "eval.tasks": "", **SHALLOW})
    setup, state = prepare.build(c)
  return c, setup, state, _batch(c, setup, np.random.default_rng(0))


def test_one_teacher_ensemble_step_equals_todays_step_exactly(shallow):
  """The step given a tuple of one teacher module (its params a tuple of one) leaves
  exactly the parameters today's step does; so does the gradient-caching step given
  cached embeddings as tuples of one array instead of plain arrays."""
  c, setup, state, batch = shallow
  c = copy.deepcopy(c)
  teacher = CLIP(setup.teacher_config)
  p0, l0 = _one_step(c, setup, state, teacher, setup.teacher_params, batch)
  p1, l1 = _one_step(c, setup, state, (teacher,), (setup.teacher_params,), batch)
  assert l0 == l1
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  out = teacher.apply({"params": setup.teacher_params}, batch["images"], batch["tokens"])
  img, txt = out["image_embeds"], out["text_embeds"]
  c.microbatch_size = 2
  p2, l2 = _one_step(c, setup, state, None, None, dict(batch, teacher_image=img,
                                                        teacher_text=txt))
  p3, l3 = _one_step(c, setup, state, None, None, dict(batch, teacher_image=(img,),
                                                        teacher_text=(txt,)))
  assert l2 == l3
  jax.tree.map(np.testing.assert_array_equal, p2, p3)


def test_cached_ensemble_of_two_widths_in_the_microbatched_step(shallow):
  """Cached embeddings of two teachers (widths 32 and 24, as tuples in member order)
  through the gradient-caching step: its loss is the rule applied to them."""
  c, setup, state, batch = shallow
  c = copy.deepcopy(c)
  c.microbatch_size = 2
  rng = np.random.default_rng(3)
  teachers = [{"image_embeds": _normed(rng, c.batch_size, d),
               "text_embeds": _normed(rng, c.batch_size, d), "logit_scale": tau}
              for d, tau in ((32, 50.0), (24, 30.0))]
  cached = {f"teacher_{k}": tuple(jax.device_put(np.float32(t[f"{k}_embeds"]),
                                                 batch["tokens"].sharding) for t in teachers)
            for k in ("image", "text")}
  setup = dataclasses.replace(setup, loss=dataclasses.replace(setup.loss, member_scales=(30.0,)))
  _, loss = _one_step(c, setup, state, None, None, dict(batch, **cached))
  out = CLIP(setup.student_config).apply({"params": jax.device_get(state.params)},
                                         batch["images"], batch["tokens"])
  student = {k: np.asarray(out[k], np.float64) for k in ("image_embeds", "text_embeds")}
  expected = torch_ensemble(dict(student, logit_scale=50.0), teachers, LossConfig())["total"]
  assert abs(loss - expected) <= 2e-6 * abs(expected), (loss, expected)


# ---------------------------------------------------------------- end to end

def _member(embed_dim=24, width=48, scale=30.0, **custom):
  """A random custom member the smoke teacher's input fits (another width)."""
  m = defaults.ensemble_member(scale=scale)
  m.custom.update({"embed_dim": embed_dim, "image_size": 32, "patch_size": 8,
                   "vision_width": width, "vision_layers": 1, "text_width": width,
                   "text_layers": 1, "head_dim": 24, "context_length": 32, **custom})
  return m


def ensemble_config(overrides=None, **members):
  c = smoke_config({"total_steps": 2, "log_every": 1, "eval.tasks": "",
                    "checkpoint_every": 100, **SHALLOW, **(overrides or {})})
  for name, m in (members or {"b": _member()}).items():
    c.teacher.ensemble[name] = m
  return c


@pytest.mark.parametrize("micro", [0, 1], ids=["one-shot", "microbatched"])
def test_two_teacher_run_trains_and_its_first_loss_follows_the_rule(micro, tmp_path,
                                                                   monkeypatch):
  """Primary (the smoke teacher, width 32, τ=50) + a random custom member of width 24
  (τ=30): the first logged loss is the rule applied to the embeddings of that step's
  batch, computed here from the run's own weights."""
  c = ensemble_config({"microbatch_size": micro})
  mesh_on(monkeypatch, jax.devices()[:2])
  seen = {}
  setup_fn, init_fn, put = prepare.setup, prepare.init_state, compile_lib.global_batch
  monkeypatch.setattr(prepare, "setup", lambda *a, **k: seen.setdefault("setup", setup_fn(*a, **k)))
  monkeypatch.setattr(prepare, "init_state", lambda config, s, params, *a: (
      seen.setdefault("student", jax.device_get(params)), init_fn(config, s, params, *a))[1])
  monkeypatch.setattr(compile_lib, "global_batch", lambda local, abstract: (
      seen.setdefault("batch", dict(local)), put(local, abstract))[1])
  runner.run(c, str(tmp_path))
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  setup = seen["setup"]
  assert len(setup.teacher_params) == 2 and setup.loss.teacher_scales == (50.0, 30.0)
  assert [cfg.embed_dim for cfg in setup.teacher_configs] == [32, 24]

  def embeds(cfg, params):
    out = CLIP(cfg).apply({"params": params}, seen["batch"]["images"], seen["batch"]["tokens"])
    return {k: np.asarray(out[k], np.float64) for k in ("image_embeds", "text_embeds")}
  student = dict(embeds(setup.student_config, seen["student"]), logit_scale=50.0)
  teachers = [dict(embeds(cfg, jax.device_get(p)), logit_scale=tau) for cfg, p, tau in
              zip(setup.teacher_configs, setup.teacher_params, (50.0, 30.0))]
  expected = torch_ensemble(student, teachers, LossConfig())["total"]
  assert abs(losses[0] - expected) <= 2e-6 * abs(expected), (losses[0], expected)
  alone = torch_ensemble(student, teachers[:1], LossConfig())["total"]
  assert abs(alone - expected) > 1e-3 * abs(expected)  # the member changed the loss


def test_members_load_deterministically_and_in_name_order():
  """all_members: the primary first as "teacher", then members by name, each random
  member seeded apart from the primary and the others, and the same again on reload."""
  c = ensemble_config({"mesh.data": 1}, zeta=_member(), alpha=_member())
  members = teacher_lib.all_members(teacher_lib.load(c, one_device_mesh(c)))
  assert [m[0] for m in members] == ["teacher", "alpha", "zeta"]
  assert [m[4] for m in members] == [50.0, 30.0, 30.0]
  leaf = lambda p: np.asarray(p["text"]["layers_0"]["mlp"]["c_fc"]["kernel"])  # noqa: E731
  alpha, zeta = leaf(members[1][2]), leaf(members[2][2])
  assert not np.array_equal(alpha, zeta)
  again = teacher_lib.all_members(teacher_lib.load(c, one_device_mesh(c)))
  np.testing.assert_array_equal(leaf(again[1][2]), alpha)


def one_device_mesh(c):
  return parallel.make_mesh(c.mesh.to_dict(), jax.devices()[:1])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("member, overrides, words", [
    (_member(image_size=64, patch_size=16), {},
     ("teacher.ensemble.b", "image_size 64", "image_size 32", "same images")),
    (_member(context_length=16), {}, ("teacher.ensemble.b", "context_length 16",
                                      "context_length 32")),
    (_member(vocab_size=1000), {}, ("teacher.ensemble.b", "vocab_size 1000",
                                    "vocab_size 49408")),
    (defaults.ensemble_member(scale=30.0), {}, ("teacher.ensemble.b names no model",)),
    (defaults.ensemble_member(checkpoint="/nonexistent/member"), {},
     ("teacher.ensemble.b.checkpoint", "/nonexistent/member", "does not exist")),
    (_member(scale=0.0), {}, ("teacher.ensemble.b.scale is 0.0", "positive")),
    (_member(), {"loss.embedding": 0.5},
     ("loss.embedding needs one teacher", "loss.embedding=0", "teacher.ensemble")),
], ids=["image-size", "context-length", "vocab", "no-model", "no-checkpoint", "scale",
        "embedding"])
def test_bad_ensemble_fails_before_compiling(member, overrides, words, tmp_path, monkeypatch,
                                             capsys):
  c = ensemble_config(overrides, b=member)
  workdir = tmp_path / "run"
  with CompileCounter() as compiles:
    t0 = time.time()
    rc = run_main(monkeypatch, c, workdir)
    elapsed = time.time() - t0
  assert rc == 2
  assert_one_sentence(capsys.readouterr().err, *words)
  assert compiles.count == 0
  assert elapsed < 20
  assert not workdir.exists() or not list(workdir.iterdir())


def test_misspelt_member_field_and_teacher_from_stage_are_refused(tmp_path):
  """Config-level refusals (the CLI turns a SetupError into its sentence and exit 2)."""
  c = ensemble_config()
  c.teacher.ensemble.b.scael = 3.0
  with pytest.raises(checks.SetupError, match=r"teacher\.ensemble\.b\.scael, which is not a "
                                              r"field \(did you mean 'scale'\?\)"):
    checks.validate(c)
  c = ensemble_config()
  c.teacher.ensemble.c = ml_collections.ConfigDict({"scale": 10.0})  # not ensemble_member()
  with pytest.raises(checks.SetupError, match=r"teacher\.ensemble\.c has no field 'activation'; "
                                              r"make each member with defaults\.ensemble_member"):
    checks.validate(c)
  c = ensemble_config()
  c.stages = ({"name": "a"}, {"name": "s", "teacher_from_stage": 0})
  with pytest.raises(checks.SetupError, match="takes its teacher from stage 0 but "
                                              "teacher.ensemble names"):
    plan.stages(c, str(tmp_path))
  c = ensemble_config(teacher=_member())
  with pytest.raises(checks.SetupError, match="teacher.ensemble.teacher is the primary "
                                              "teacher's name"):
    checks.validate(c)


def test_stage_identity_and_teacher_key_name_the_members():
  """A stage started with another ensemble (or member τ) is another stage, and a loaded
  teacher is shared only by equal ensembles; one teacher's identity is as before
  ensembles existed (no `ensemble` field), so earlier stage folders still resume."""
  one, two = smoke_config(), ensemble_config()
  assert "ensemble" not in runner.identity(one)["teacher"]
  assert runner.identity(two)["teacher"]["ensemble"]["b"]["scale"] == 30.0
  other = ensemble_config()
  other.teacher.ensemble.b.scale = 40.0
  keys = {teacher_lib.key(c) for c in (one, two, other)}
  assert len(keys) == 3 and teacher_lib.key(ensemble_config()) in keys
  diff = runner._first_difference(runner.identity(two), runner.identity(other))  # pylint: disable=protected-access
  assert diff == ("teacher.ensemble.b.scale", 30.0, 40.0)
