"""Structure masks of automatic weight inheritance (inherit/masks.py) and the prune
step (inherit/prune.py), against torch spellings of the reference's formulas.

References written here: the hard-concrete quantile, CDF and deterministic gates of
TinyCLIP's L0Module; its expected-parameter count (outer products of hidden and
head/unit scores); its masked forward (LayerNorm over the kept dims, head / unit /
hidden / layer gates) in torch ops over the same weights.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyclip_jax.inherit import masks, prune
from tinyclip_jax.models import (CLIP, CLIPConfig, count_params, init_params, param_shapes,
                                 text_tower, vision_tower)

A, B, EPS, BETA = -0.1, 1.1, 1e-6, 2.0 / 3.0
ALL_KINDS = ("hidden", "heads", "intermediate", "layer")


def torch_cdf(x, loga):
  xn = (x - A) / (B - A)
  return torch.sigmoid((math.log(xn) - math.log(1 - xn)) * BETA - loga).clamp(EPS, 1 - EPS)


def torch_quantile(u, loga):
  s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + loga) / BETA)
  return F.hardtanh(s * (B - A) + A, min_val=0.0, max_val=1.0)


def torch_deterministic(loga):
  """The reference's _deterministic_z for one row (or a scalar gate of size 1)."""
  soft = torch.sigmoid(loga / BETA * 0.8)
  size = 1 if loga.ndim == 0 else loga.numel()
  num_zeros = round(size - (1 - torch_cdf(0.0, loga)).sum().item())
  if num_zeros > 0:
    if soft.ndim == 0:
      return torch.tensor(0.0)
    _, idx = torch.topk(soft, k=num_zeros, largest=False)
    soft = soft.clone()
    soft[idx] = 0.0
  return soft


def small_config(layers=3):
  return CLIPConfig(32, vision_tower(128, layers, 8, image_size=32),
                    text_tower(128, 2, context_length=16, vocab_size=300))


@functools.lru_cache
def _jitted_forward(cfg):
  return jax.jit(lambda p, i, t, g: CLIP(cfg).apply({"params": p}, i, t, gates=g))


def forward(cfg, params, images, tokens, gates=None):
  """CLIP(cfg).apply compiled whole: op by op, a forward takes far longer."""
  return _jitted_forward(cfg)(params, images, tokens, gates)


def random_logas(valid, seed, low=-4.0, high=5.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: jnp.asarray(rng.uniform(low, high, v.shape), jnp.float32), valid)


# ----------------------------------------------------------------------------- gates


@pytest.mark.parametrize("loga", [-2.0, 0.0, 1.5, 4.0])
def test_hard_concrete_sampling_statistics_match_the_closed_form(loga):
  n = 200_000
  u = jax.random.uniform(jax.random.key(1), (n,), jnp.float32, EPS, 1 - EPS)
  z = np.asarray(masks.sample_gates(jnp.full((n,), loga), u))
  # The sampler is the reference's quantile function, value for value.
  ref = torch_quantile(torch.from_numpy(np.asarray(u, np.float64)), loga).numpy()
  np.testing.assert_allclose(z, ref, atol=2e-6)
  for x in (0.0, 0.25, 0.5, 0.75):
    p = float(torch_cdf(x, torch.tensor(loga, dtype=torch.float64)))
    empirical = (z <= x).mean()
    assert abs(empirical - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4, (x, empirical, p)
  keep = float(1 - torch_cdf(0.0, torch.tensor(loga, dtype=torch.float64)))
  assert abs(float(masks.keep_prob(jnp.float32(loga))) - keep) < 1e-6
  assert abs((z > 0).mean() - keep) < 5 * math.sqrt(keep * (1 - keep) / n) + 1e-4


def test_deterministic_gates_match_the_reference_rule():
  cfg = small_config()
  valid = masks.model_valid(cfg, ("visual", "text"), ALL_KINDS)
  logas = random_logas(valid, seed=3)
  got = masks.deterministic_gates(logas, valid)
  for tower, kinds in logas.items():
    for kind, loga in kinds.items():
      t = torch.from_numpy(np.asarray(loga, np.float64))
      if kind == "hidden":
        want = torch_deterministic(t)
      else:  # per layer (rows), and mha/ffn one scalar gate per layer
        want = torch.stack([torch_deterministic(row) for row in t])
      np.testing.assert_allclose(
          np.asarray(got[tower][kind]), want.numpy(), atol=1e-6, err_msg=f"{tower}/{kind}")
  # A layer that lost fewer heads than it has keeps soft (not unit) values, as the reference.
  assert 0 < float(jnp.max(got["visual"]["heads"])) < 1


def test_padded_rows_of_uneven_layers_are_always_closed():
  cfg = CLIPConfig(32, vision_tower(128, 2, 8, image_size=32, heads=(2, 1), mlp=(64, 16)),
                   text_tower(64, 1, context_length=16, vocab_size=300))
  valid = masks.model_valid(cfg, ("visual",), ALL_KINDS)
  logas = masks.init_logas(valid)
  g = masks.deterministic_gates(logas, valid)["visual"]
  assert g["heads"].shape == (2, 2) and float(g["heads"][1, 1]) == 0.0
  assert float(g["intermediate"][1, 16:].max()) == 0.0 and float(
      g["intermediate"][1, :16].min()) > 0
  noise = masks.uniform_noise(jax.random.key(0), logas)
  z = masks.training_gates(logas, valid, noise)["visual"]
  assert float(z["heads"][1, 1]) == 0.0 and float(z["intermediate"][1, 16:].max()) == 0.0


# ----------------------------------------------------------------------------- accounting


def torch_expected(logas, d, heads, inter, layers, hidden):
  """TinyCLIP's L0Module.get_num_parameters_and_constraint, spelled out in torch."""
  pph = (4 * d * d + 4 * d) // heads
  ppi = (2 * d * inter + d + inter) // inter
  score = {
      k: 1 - torch_cdf(0.0, torch.from_numpy(np.asarray(v, np.float64))) for k, v in logas.items()
  }
  mha = score["mha"].view(-1, 1, 1) if "mha" in score else torch.ones(layers, 1, 1)
  head = score["heads"].unsqueeze(-1) if "heads" in score else torch.ones(layers, heads, 1)
  ffn = score["ffn"].unsqueeze(-1) if "ffn" in score else 1
  units = score["intermediate"] if "intermediate" in score else torch.ones(layers, inter)
  units = units * ffn
  if hidden:
    h = score["hidden"]
    n = torch.outer(h, (head * mha).reshape(-1)).sum() * pph / d
    return float(n + torch.outer(h, units.reshape(-1)).sum() * 2)
  return float((head * mha).sum() * pph + units.sum() * ppi)


@pytest.mark.parametrize(
    "kinds",
    [ALL_KINDS, ("heads", "intermediate"), ("hidden", "heads", "intermediate"), ("intermediate",)])
def test_expected_params_match_the_reference_formula(kinds):
  cfg = small_config()
  valid = masks.model_valid(cfg, ("visual",), kinds)
  logas = random_logas(valid, seed=5)["visual"]
  v = cfg.vision
  want = torch_expected(logas, v.width, v.heads[0], v.mlp[0], v.layers, "hidden" in kinds)
  got = float(masks.expected_params(logas, valid["visual"], v))
  assert abs(got - want) <= 1e-5 * want
  # The reference's prunable size: L·(2dI + d + I) + L·H·((4d² + 4d) // H).
  d, h, i, n = v.width, v.heads[0], v.mlp[0], v.layers
  assert masks.prunable_params(v) == n * (2 * d * i + d + i) + n * h * ((4 * d * d + 4 * d) // h)


def attn_mlp_params(tower_params) -> int:
  return sum(
      count_params(b.get(k, {})) for name, b in tower_params.items() if name.startswith("layers_")
      for k in ("attn", "mlp"))


def test_expected_params_of_decided_gates_count_the_pruned_model():
  """Gates pushed to 0 or 1: the expectation is the pruned model's own attention and
  MLP parameter count, up to the reference's per-head rounding (biases, < 1%)."""
  cfg = small_config(layers=4)
  valid = masks.model_valid(cfg, ("visual",), ("hidden", "heads", "intermediate"))
  rng = np.random.default_rng(7)
  logas = jax.tree.map(
      lambda v: jnp.asarray(np.where(rng.random(v.shape) < 0.3, -60.0, 60.0), jnp.float32), valid)
  expected = float(masks.expected_params(logas["visual"], valid["visual"], cfg.vision))
  params = init_params(cfg, jax.random.key(0))
  pruned, _ = prune.prune(params, cfg, masks.deterministic_gates(logas, valid))
  direct = attn_mlp_params(pruned["visual"])
  assert abs(expected - direct) / direct < 0.01, (expected, direct)


def test_lagrangian_ascent_raises_the_penalty_below_target():
  cfg = small_config()
  valid = masks.model_valid(cfg, ("visual", "text"), ("hidden", "heads", "intermediate"))
  logas = masks.init_logas(valid)
  lambdas = masks.init_lambdas(("visual", "text"))
  import ml_collections  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train.state import make_mask_optimizer  # pylint: disable=import-outside-toplevel
  opt = ml_collections.ConfigDict({"b1": 0.9, "b2": 0.98, "eps": 1e-6})
  tx = make_mask_optimizer(ml_collections.ConfigDict({"lr": 0.02, "lambda_lr": -0.02}), opt)
  state = {"logas": logas, "lambdas": lambdas}
  opt_state = tx.init(state)

  def penalty(lam):
    return masks.sparsity_terms(logas, lam, valid, cfg, cfg, 10, 0.0, 0.5, 10, False)[0]

  grad = jax.grad(penalty)(lambdas)
  assert all(float(g.min()) > 0 for g in grad.values())  # dL/dλ > 0 while below target
  values = [float(penalty(state["lambdas"]))]
  for _ in range(5):
    g = {
        "logas": jax.tree.map(jnp.zeros_like, logas),
        "lambdas": jax.grad(penalty)(state["lambdas"])
    }
    updates, opt_state = tx.update(g, opt_state, state)
    state = jax.tree.map(lambda p, u: p + u, state, updates)
    values.append(float(penalty(state["lambdas"])))
  assert all(b > a for a, b in zip(values, values[1:])), values
  assert all(float(l.min()) > masks.INIT_LAMBDA for l in state["lambdas"].values())


# ----------------------------------------------------------------------------- forward & prune


def ln_kept(x, w, b, keep):
  """The reference LayerNorm with a hidden mask: statistics over the kept dims only."""
  idx = torch.where(keep)[0]
  out = torch.zeros_like(x)
  out[..., idx] = F.layer_norm(x[..., idx], (len(idx),), w[idx], b[idx], 1e-5)
  return out


def torch_tower(p, x, g, heads, mlp, causal, pool):
  """The reference's masked blocks (input: the gated embeddings) in torch ops."""
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
  hidden = t(g["hidden"])
  keep = hidden != 0
  n = x.shape[1]
  for i, (h, m) in enumerate(zip(heads, mlp)):
    blk = p[f"layers_{i}"]
    if h:
      y = ln_kept(x, t(blk["ln_1"]["scale"]), t(blk["ln_1"]["bias"]), keep)
      w = t(blk["attn"]["in_proj_kernel"])  # (W, 3, H, 64)
      qkv = torch.einsum("bnw,wthd->tbhnd", y, w) + t(blk["attn"]["in_proj_bias"])[:, None, :, None]
      att = (qkv[0] / 8.0) @ qkv[1].transpose(-1, -2)
      if causal:
        att = att + torch.full((n, n), float("-inf"), dtype=att.dtype).triu(1)
      o = att.softmax(-1) @ qkv[2] * t(g["heads"][i, :h])[None, :, None, None]
      o = torch.einsum("bhnd,hdw->bnw", o, t(blk["attn"]["out_proj_kernel"]))
      x = x + (o + t(blk["attn"]["out_proj_bias"])) * hidden * t(g["mha"][i])
    if m:
      y = ln_kept(x, t(blk["ln_2"]["scale"]), t(blk["ln_2"]["bias"]), keep)
      u = F.gelu(y @ t(blk["mlp"]["c_fc"]["kernel"]) + t(blk["mlp"]["c_fc"]["bias"]))
      u = u * t(g["intermediate"][i, :m])
      y = u @ t(blk["mlp"]["c_proj"]["kernel"]) + t(blk["mlp"]["c_proj"]["bias"])
      x = x + y * hidden * t(g["ffn"][i])
  return x[torch.arange(x.shape[0]), pool], keep


def torch_masked_clip(params, cfg, gates, images, tokens):
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
  v, tp = params["visual"], params["text"]
  gv, gt = gates["visual"], gates["text"]
  p = cfg.vision.patch_size
  img = t(images).permute(0, 3, 1, 2)
  x = F.conv2d(img, t(v["conv1"]).permute(3, 2, 0, 1), stride=p).flatten(2).transpose(1, 2)
  x = torch.cat([t(v["class_embedding"]).expand(x.shape[0], 1, -1), x], 1) + t(
      v["positional_embedding"])
  x = x * t(gv["hidden"])
  x = ln_kept(x, t(v["ln_pre"]["scale"]), t(v["ln_pre"]["bias"]), t(gv["hidden"]) != 0)
  x, keep = torch_tower(v, x, gv, cfg.vision.heads, cfg.vision.mlp, False,
                        torch.zeros(x.shape[0], dtype=torch.long))
  img_emb = ln_kept(x, t(v["ln_post"]["scale"]), t(v["ln_post"]["bias"]), keep) @ t(v["proj"])
  ids = torch.from_numpy(np.asarray(tokens)).long()
  x = t(tp["token_embedding"])[ids] + t(tp["positional_embedding"])[:ids.shape[1]]
  x = x * t(gt["hidden"])
  eot = (ids == cfg.text.eot_token_id).int().argmax(-1)  # the first end-of-text token
  x, keep = torch_tower(tp, x, gt, cfg.text.heads, cfg.text.mlp, True, eot)
  txt_emb = ln_kept(x, t(tp["ln_final"]["scale"]), t(tp["ln_final"]["bias"]), keep) @ t(
      tp["text_projection"])
  return F.normalize(img_emb, dim=-1).numpy(), F.normalize(txt_emb, dim=-1).numpy()


@pytest.fixture(scope="module")
def masked_setup():
  cfg = small_config()
  params = init_params(cfg, jax.random.key(0))
  valid = masks.model_valid(cfg, ("visual", "text"), ALL_KINDS)
  logas = random_logas(valid, seed=11, low=-3.0, high=4.0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
  tokens = rng.integers(1, 299, size=(3, 16))
  tokens[[0, 1, 2, 0], [6, 9, 12, 14]] = cfg.text.eot_token_id  # 299; pooled at the first
  return cfg, params, valid, logas, images, jnp.asarray(tokens, jnp.int32)


def test_masked_forward_matches_a_torch_spelling_of_the_reference(masked_setup):
  cfg, params, valid, logas, images, tokens = masked_setup
  noise = masks.uniform_noise(jax.random.key(2), logas)
  gates = masks.training_gates(logas, valid, noise)  # soft values and exact zeros
  assert 0 < float((gates["visual"]["hidden"] == 0).mean()) < 1
  out = forward(cfg, params, images, tokens, gates)
  want_i, want_t = torch_masked_clip(params, cfg, gates, images, tokens)
  np.testing.assert_allclose(np.asarray(out["image_embeds"]), want_i, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["text_embeds"]), want_t, atol=1e-5)


def test_pruned_model_equals_the_masked_model(masked_setup):
  cfg, params, valid, logas, images, tokens = masked_setup
  gates = masks.deterministic_gates(logas, valid)
  masked = forward(cfg, params, images, tokens, gates)
  pruned, pruned_cfg = prune.prune(params, cfg, gates)
  assert pruned_cfg.vision.width < cfg.vision.width
  assert count_params(pruned) < count_params(params)
  # The shapes a fresh init of the pruned config has (jax.eval_shape of init_params).
  assert jax.tree.map(np.shape, pruned) == jax.tree.map(np.shape, param_shapes(pruned_cfg))
  out = forward(pruned_cfg, jax.tree.map(jnp.asarray, pruned), images, tokens)
  for k in ("image_embeds", "text_embeds"):
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(masked[k]), atol=1e-5)
  kept = prune.structure(cfg, gates)
  for tower, field in (("visual", "vision"), ("text", "text")):
    t = getattr(pruned_cfg, field)
    assert kept[tower]["width"] == t.width
    assert [h for h, m in zip(kept[tower]["heads"], kept[tower]["mlp"]) if h or m] == list(t.heads)


def test_a_layer_with_both_sub_layers_closed_is_removed():
  cfg = small_config()
  params = init_params(cfg, jax.random.key(0))
  valid = masks.model_valid(cfg, ("visual",), ("layer",))
  logas = masks.init_logas(valid)
  logas["visual"]["mha"] = logas["visual"]["mha"].at[1].set(-60.0)
  logas["visual"]["ffn"] = logas["visual"]["ffn"].at[1].set(-60.0)
  logas["visual"]["ffn"] = logas["visual"]["ffn"].at[2].set(-60.0)
  pruned, pcfg = prune.prune(params, cfg, masks.deterministic_gates(logas, valid))
  assert pcfg.vision.heads == (2, 2) and pcfg.vision.mlp == (512, 0)
  assert sorted(k for k in pruned["visual"] if k.startswith("layers_")) == ["layers_0", "layers_1"]


def test_masks_on_a_tower_the_model_lacks_is_an_error():
  with pytest.raises(masks.MaskError, match="masks.towers names 'audio'"):
    masks.model_valid(small_config(), ("audio",), ("heads",))
  with pytest.raises(masks.MaskError, match="masks.kinds"):
    masks.model_valid(small_config(), ("visual",), ("rows",))


def test_masked_tinyclip_checkpoint_imports_as_the_pruned_model(masked_setup):
  """A TinyCLIP training checkpoint (full weights + L0Module log α) reads as the full
  model and its masks; pruned with their deterministic gates it is the model TinyCLIP
  evaluates: the masked forward with the reference's gates (computed here in torch)."""
  from tinyclip_jax.convert import (CheckpointError, from_tinyclip,  # pylint: disable=C0415
                                    from_tinyclip_with_masks, to_tinyclip)
  cfg, params, valid, logas, images, tokens = masked_setup
  sd = to_tinyclip(params, cfg)
  names = {"hidden": "hidden_loga", "heads": "heads_loga", "intermediate": "intermediate_loga",
           "mha": "mha_loga", "ffn": "ffn_loga"}
  gates = {}
  for tower, prefix in (("visual", "_image_encoder.module."), ("text", "_text_encoder.module.")):
    gates[tower] = {}
    for kind, loga in logas[tower].items():
      sd[f"{prefix}l0_module.{names[kind]}"] = np.asarray(loga)
      t = torch.from_numpy(np.asarray(loga, np.float64))
      gates[tower][kind] = (torch_deterministic(t) if kind == "hidden" else
                            torch.stack([torch_deterministic(r) for r in t])).numpy()
    sd[f"{prefix}l0_module.lambda_1"] = np.float32(10.0)
  full, full_cfg, read_logas = from_tinyclip_with_masks(sd, cfg.activation)
  assert full_cfg == cfg and set(read_logas) == {"visual", "text"}
  with pytest.raises(CheckpointError, match="masked TinyCLIP training checkpoint"):
    from_tinyclip(sd, cfg.activation)  # the pruned-model reader does not prune silently
  pruned, pcfg = prune.prune_deterministic(full, full_cfg, read_logas)
  assert pcfg.vision.width < cfg.vision.width
  out = forward(pcfg, jax.tree.map(jnp.asarray, pruned), images, tokens)
  want_i, want_t = torch_masked_clip(params, cfg, gates, images, tokens)
  np.testing.assert_allclose(np.asarray(out["image_embeds"]), want_i, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["text_embeds"]), want_t, atol=1e-5)
