"""The optimizer's weight-decay mask against open_clip's rule, applied here to the
open_clip names and ranks of the exported state dict, and one AdamW update against
torch.optim.AdamW with open_clip's two parameter groups."""
import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch

from tinyclip_jax.convert import flatten, to_open_clip, to_tinyclip, unflatten
from tinyclip_jax.models import (CLIPConfig, merge_stats, param_shapes, resnet_tower, split_stats,
                                 text_tower, vision_tower)
from tinyclip_jax.train.state import decay_mask, make_optimizer

TEXT = dict(context_length=8, vocab_size=50)
VIT = CLIPConfig(16, vision_tower(64, 2, 8, image_size=16), text_tower(64, 2, **TEXT), "quick_gelu")
# Per-layer widths, a vision block without MLP and one without attention, a text block
# without attention, hidden widths that are not multiples of 64 (a pruned student).
PRUNED = CLIPConfig(
    24, vision_tower(96, 3, 8, image_size=32, heads=(1, 2, 0), mlp=(200, 0, 40)),
    text_tower(80, 2, heads=(1, 0), mlp=(100, 30), **TEXT), "gelu")
RESNET = CLIPConfig(16, resnet_tower(8, (1, 1, 2, 1), image_size=64),
                    text_tower(64, 1, heads=1, **TEXT), "quick_gelu")
# Uniform towers export to open_clip's CLIP; the pruned one to TinyCLIP's pruned CLIP
# (no zero padding, so every exported element is one of the model's).
EXPORTS = {"vit": (VIT, to_open_clip), "pruned": (PRUNED, to_tinyclip),
           "resnet": (RESNET, to_open_clip)}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm, not parameters


def open_clip_excludes(name: str, ndim: int) -> bool:
  # open_clip's training/main.py: `exclude` gets weight_decay 0.
  return ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def numbered(config) -> dict[str, np.ndarray]:
  """Flat weights whose elements are the distinct integers 0, 1, … (exact in float32),
  so an exported tensor tells by its values which leaves it came from."""
  flat, start = {}, 0
  for path, s in flatten(param_shapes(config)).items():
    n = int(np.prod(s.shape))
    assert n > 0, path
    flat[path] = (start + np.arange(n, dtype=np.float32)).reshape(s.shape)
    start += n
  assert start < 2**24
  return flat


def expected_mask(flat, exported) -> dict[str, bool]:
  """{leaf: decayed} by open_clip's rule on the exported tensors each leaf's elements
  went to; checks every element of every param leaf went to exactly one parameter."""
  paths = list(flat)
  starts = np.array([flat[p].ravel()[0] for p in paths])
  decayed, seen = {}, []
  for key, t in exported.items():
    if key.endswith(BUFFERS):
      continue
    values = np.asarray(t, np.float32).ravel()
    seen.append(values)
    for i in np.unique(np.searchsorted(starts, values, side="right") - 1):
      decayed.setdefault(paths[i], set()).add(not open_clip_excludes(key, np.ndim(t)))
  params = [p for p in paths if p.split("/")[-1] not in ("mean", "var")]
  want = np.sort(np.concatenate([flat[p].ravel() for p in params]))
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), want)
  assert all(len(d) == 1 for d in decayed.values()), decayed
  return {p: decayed[p].pop() for p in params}


@pytest.mark.parametrize("name", EXPORTS)
def test_decay_mask_is_open_clips_rule_leaf_by_leaf(name):
  config, export = EXPORTS[name]
  flat = numbered(config)
  want = expected_mask(flat, export(unflatten(flat), config))
  params, _ = split_stats(unflatten(flat))
  got = flatten(decay_mask(config)(params))
  assert sorted(got) == sorted(want)
  wrong = {p: got[p] for p in want if got[p] != want[p]}
  assert not wrong, f"decay differs from open_clip's rule for {wrong}"
  assert set(want.values()) == {True, False}
  if name != "resnet":  # the fused attention bias is 3-D here, 1-D in open_clip
    assert want["visual/layers_0/attn/in_proj_bias"] is False
    assert want["text/token_embedding"] is True and want["visual/class_embedding"] is False


def test_decay_mask_refuses_a_param_the_model_lacks():
  params, _ = split_stats(unflatten(numbered(VIT)))
  params["visual"]["extra"] = np.zeros((4, 4), np.float32)
  with pytest.raises(ValueError, match="param `visual/extra` has no open_clip counterpart"):
    decay_mask(VIT)(params)


def random_like(tree, rng):
  return {k: random_like(v, rng) if isinstance(v, dict) else
          rng.standard_normal(np.shape(v)).astype(np.float32) for k, v in tree.items()}


@pytest.mark.parametrize("config", [VIT, RESNET], ids=["vit", "resnet"])
def test_adamw_matches_torch_with_open_clips_param_groups(config):
  rng = np.random.default_rng(0)
  weights = {p: rng.standard_normal(s.shape).astype(np.float32)
             for p, s in flatten(param_shapes(config)).items()}
  params, stats = split_stats(unflatten(weights))
  start = params
  grads = [random_like(params, rng) for _ in range(2)]
  lr, wd = 0.1, 0.5  # end_lr = lr: a constant rate, so torch needs no schedule
  opt = ml_collections.ConfigDict({"lr": lr, "end_lr": lr, "warmup_steps": 0, "b1": 0.9,
                                   "b2": 0.98, "eps": 1e-6, "weight_decay": wd, "grad_clip": 0.0})
  tx = make_optimizer(opt, 100, 1, model_config=config)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  for g in grads:
    params, state = step(params, state, g)

  def torch_layout(tree):
    sd = to_open_clip(merge_stats(tree, stats), config)
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items() if not k.endswith(BUFFERS)}

  ref = {k: torch.nn.Parameter(v) for k, v in torch_layout(start).items()}
  groups = [{"params": [p for k, p in ref.items() if open_clip_excludes(k, p.ndim)],
             "weight_decay": 0.0},
            {"params": [p for k, p in ref.items() if not open_clip_excludes(k, p.ndim)],
             "weight_decay": wd}]
  torch_opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
  for g in grads:
    for k, gk in torch_layout(g).items():
      ref[k].grad = gk
    torch_opt.step()
  got = torch_layout(params)
  for k, p in ref.items():
    # float32: the two spellings of the update round differently (|p| < 5: 4 ulp).
    np.testing.assert_allclose(got[k].numpy(), p.detach().numpy(), rtol=0, atol=2e-6, err_msg=k)
