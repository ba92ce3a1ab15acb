"""Checkpoint maps: parity with PyTorch (HF CLIPModel and an OpenAI-style reference),
bit-exact round trips, config inference over the zoo, and the error messages."""
import functools

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel

from torch_reference import CLIP as TorchCLIP
from tinyclip_jax.convert import (CheckpointError, check_params, flatten, from_hf, from_openai,
                                  to_hf, to_open_clip, unflatten)
from tinyclip_jax.models import CLIP, CLIPConfig, count_params, param_shapes, zoo
from tinyclip_jax.models import text_tower, vision_tower

TOL = 1e-5


def tiny(activation="quick_gelu"):
  # head_dim 64 everywhere: OpenAI-format state dicts do not record it.
  return CLIPConfig(24, vision_tower(128, 2, 8, image_size=32, mlp=96),
                    text_tower(64, 2, mlp=80, context_length=12, vocab_size=50),
                    activation=activation)


def inputs(cfg, b=3, seed=0):
  rng = np.random.RandomState(seed)
  s, n, v = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
  img = rng.randn(b, s, s, 3).astype(np.float32)
  tok = rng.randint(1, v - 1, (b, n)).astype(np.int32)
  for row, end in enumerate(range(3, 3 + b)):  # EOT (the largest id) mid-sequence, then pad
    tok[row, end] = v - 1
    tok[row, end + 1:] = 0
  return img, tok


def randomize_(module: torch.nn.Module, seed=0):
  """Random LayerNorm scales/biases and biases (inits of 1/0 would hide mix-ups)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      is_ln = "ln" in name or "norm" in name or "layrnorm" in name
      if is_ln and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      elif name.endswith("bias") or name.endswith("class_embedding"):
        p.copy_(0.05 * noise)
  return module.eval()


def random_params(cfg, seed=0):
  """Random canonical params straight from the shapes (no Flax init: it is slow on CPU)."""
  rng = np.random.RandomState(seed)
  def leaf(path, shape):
    x = np.float32(0.05) * np.asarray(rng.randn(*shape), np.float32)
    return x + np.float32(1) if path.endswith("/scale") else x
  return unflatten({k: leaf(k, v.shape) for k, v in flatten(param_shapes(cfg)).items()})


@functools.lru_cache(maxsize=None)
def _embed_fn(cfg):
  model = CLIP(cfg)

  @jax.jit
  def f(params, img, tok):
    v = {"params": params}
    out = model.apply(v, img, tok)
    return (model.apply(v, img, method=CLIP.encode_image),
            model.apply(v, tok, method=CLIP.encode_text), out["image_embeds"], out["text_embeds"])
  return f


def flax_embed(params, cfg, img, tok):
  return [np.asarray(x) for x in _embed_fn(cfg)(params, img, tok)]


def _features(x):
  return (x.pooler_output if hasattr(x, "pooler_output") else x).numpy()


@torch.no_grad()
def hf_embed(model, img, tok):
  i = _features(model.get_image_features(pixel_values=torch.from_numpy(img.transpose(0, 3, 1, 2))))
  t = _features(model.get_text_features(input_ids=torch.from_numpy(tok).long()))
  return [i, t, _l2(i), _l2(t)]


@torch.no_grad()
def ref_embed(model, img, tok):
  i = model.encode_image(torch.from_numpy(img.transpose(0, 3, 1, 2))).numpy()
  t = model.encode_text(torch.from_numpy(tok).long()).numpy()
  return [i, t, _l2(i), _l2(t)]


def _l2(x):
  return F.normalize(torch.from_numpy(x), dim=-1).numpy()


def assert_close(got, want):
  names = ("encode_image", "encode_text", "image_embeds", "text_embeds")
  for name, a, b in zip(names, got, want):
    err = np.abs(a - b).max()
    assert err < TOL, f"{name}: max abs diff {err:.2e}"
  return max(np.abs(a - b).max() for a, b in zip(got, want))


def assert_trees_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype == np.float32, k
    assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


def hf_model(cfg, seed=0):
  """A random CLIPModel whose config is written out by hand from `cfg`."""
  v, t, act = cfg.vision, cfg.text, cfg.activation
  hf_cfg = HFConfig(
      projection_dim=cfg.embed_dim,
      vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp[0], hidden_act=act,
                         num_hidden_layers=v.layers, num_attention_heads=v.heads[0],
                         image_size=v.image_size, patch_size=v.patch_size),
      text_config=dict(hidden_size=t.width, intermediate_size=t.mlp[0], hidden_act=act,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads[0],
                       max_position_embeddings=t.context_length, vocab_size=t.vocab_size,
                       eos_token_id=t.vocab_size - 1, bos_token_id=t.vocab_size - 2))
  torch.manual_seed(seed)
  return randomize_(CLIPModel(hf_cfg), seed)


def zero_params(cfg):
  return unflatten({k: np.zeros(v.shape, np.float32) for k, v in flatten(param_shapes(cfg)).items()})


def numpy_sd(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- HF parity

@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_parity_tiny(act):
  cfg = tiny(act)
  model = hf_model(cfg)
  params, got_cfg = from_hf(numpy_sd(model), model.config.to_dict())
  assert got_cfg == cfg
  img, tok = inputs(cfg)
  assert_close(flax_embed(params, cfg, img, tok), hf_embed(model, img, tok))


def test_hf_parity_vit_b32():
  cfg = zoo.get("ViT-B-32", activation="quick_gelu")
  model = hf_model(cfg, seed=1)
  params, got_cfg = from_hf(numpy_sd(model), model.config.to_dict())
  assert got_cfg == cfg
  img, tok = inputs(cfg, b=2)
  assert_close(flax_embed(params, cfg, img, tok), hf_embed(model, img, tok))


# ----------------------------------------------------------------------------- OpenAI parity

def _tinyclip_layout(sd, ddp):
  wrap = ".module." if ddp else "."
  out = {}
  for k, v in sd.items():
    if k.startswith("visual."):
      out[f"_image_encoder{wrap}{k}"] = v
    elif k == "logit_scale":
      out[f"_logit_scale{wrap}{k}"] = v
    else:
      out[f"_text_encoder{wrap}{k}"] = v
  out["_text_encoder.attn_mask"] = np.zeros((12, 12), np.float32)
  return out


LAYOUTS = {
    "plain": lambda sd: sd,
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "tinyclip": lambda sd: _tinyclip_layout(sd, ddp=False),
    "tinyclip_ddp": lambda sd: {"state_dict": _tinyclip_layout(sd, ddp=True)},
    "openai_extras": lambda sd: {**sd, "input_resolution": np.int64(32),
                                 "context_length": np.int64(12), "vocab_size": np.int64(50),
                                 "attn_mask": np.zeros((12, 12), np.float32)},
}


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_openai_parity(act, layout, dtype):
  cfg = tiny(act)
  torch.manual_seed(0)
  ref = randomize_(TorchCLIP.from_config(cfg))
  sd = numpy_sd(ref)
  if dtype != np.float32:  # compare against torch run on the rounded weights
    sd = {k: v.astype(dtype) for k, v in sd.items()}
    ref.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()})
  params, got_cfg = from_openai(LAYOUTS[layout](sd), act)
  assert got_cfg == cfg
  img, tok = inputs(cfg)
  assert_close(flax_embed(params, cfg, img, tok), ref_embed(ref, img, tok))


def test_openai_bfloat16_weights_are_upcast():
  cfg = tiny()
  sd = to_open_clip(random_params(cfg), cfg)
  params, _ = from_openai({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, "quick_gelu")
  want = sd["visual.proj"].astype(ml_dtypes.bfloat16).astype(np.float32)
  assert params["visual"]["proj"].dtype == np.float32
  assert np.array_equal(params["visual"]["proj"], want)


def test_torch_reference_traces_and_scripts():
  cfg = tiny()
  ref = randomize_(TorchCLIP.from_config(cfg))
  img, tok = inputs(cfg)
  img, tok = torch.from_numpy(img.transpose(0, 3, 1, 2)), torch.from_numpy(tok).long()
  want = ref(img, tok)
  for compiled in (torch.jit.trace(ref, (img, tok)), torch.jit.script(ref)):
    for a, b in zip(compiled(img, tok), want):
      assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_round_trip_open_clip(act):
  cfg = tiny(act)
  params = random_params(cfg, 0)
  sd = to_open_clip(params, cfg)
  ref = TorchCLIP.from_config(cfg)
  assert sd.keys() == ref.state_dict().keys()
  assert all(v.dtype == np.float32 for v in sd.values())
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  back, back_cfg = from_openai(sd, act)
  assert back_cfg == cfg
  assert_trees_equal(back, params)
  img, tok = inputs(cfg)
  assert_close(flax_embed(params, cfg, img, tok), ref_embed(ref.eval(), img, tok))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_round_trip_hf(act):
  cfg = tiny(act)
  params = random_params(cfg, 1)
  sd, hf_cfg = to_hf(params, cfg)
  back, back_cfg = from_hf(sd, hf_cfg)
  assert back_cfg == cfg
  assert_trees_equal(back, params)
  model = CLIPModel(HFConfig(**hf_cfg)).eval()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  assert not result.missing_keys and not result.unexpected_keys
  assert model.config.text_config.eos_token_id == cfg.text.vocab_size - 1
  img, tok = inputs(cfg)
  assert_close(flax_embed(params, cfg, img, tok), hf_embed(model, img, tok))


def test_hf_config_uses_clip_special_tokens_for_the_real_vocab():
  hf_cfg = to_hf(zero_params(zoo.get("TinyCLIP-ViT-8M-16-Text-3M")),
                 zoo.get("TinyCLIP-ViT-8M-16-Text-3M"))[1]["text_config"]
  assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (49406, 49407, 1)


def test_from_openai_reads_pruned_blocks():
  cfg = tiny()
  sd = to_open_clip(random_params(cfg, 2), cfg)
  pre = "visual.transformer.resblocks."
  for k in [k for k in sd if k.startswith(pre + "1.") and (".attn." in k or ".ln_1." in k)]:
    del sd[k]  # block 1 lost its attention
  w = sd[pre + "0.attn.in_proj_weight"].reshape(3, 2, 64, 128)
  sd[pre + "0.attn.in_proj_weight"] = w[:, :1].reshape(-1, 128)  # block 0 keeps one head
  sd[pre + "0.attn.in_proj_bias"] = sd[pre + "0.attn.in_proj_bias"].reshape(3, 2, 64)[:, :1].ravel()
  sd[pre + "0.attn.out_proj.weight"] = sd[pre + "0.attn.out_proj.weight"][:, :64]
  sd["transformer.resblocks.1.mlp.c_fc.weight"] = sd["transformer.resblocks.1.mlp.c_fc.weight"][:40]
  sd["transformer.resblocks.1.mlp.c_fc.bias"] = sd["transformer.resblocks.1.mlp.c_fc.bias"][:40]
  sd["transformer.resblocks.1.mlp.c_proj.weight"] = sd["transformer.resblocks.1.mlp.c_proj.weight"][:, :40]
  params, got = from_openai(sd, "quick_gelu")
  assert got.vision.heads == (1, 0) and got.text.mlp == (80, 40)
  assert "attn" not in params["visual"]["layers_1"]
  img, tok = inputs(got)
  assert all(np.isfinite(x).all() for x in flax_embed(params, got, img, tok))
  # Exports pad pruned towers to uniform widths (parity: tests/test_convert_pruned.py);
  # HF's config.json also records the pruned config, which the import cuts back to.
  assert from_openai(to_open_clip(params, got), "quick_gelu")[1].vision.heads == (2, 2)
  sd, hf_cfg = to_hf(params, got)
  assert hf_cfg["text_config"]["intermediate_size"] == 80 and sd[
      "text_model.encoder.layers.1.mlp.fc1.weight"].shape == (80, 64)
  assert_trees_equal(from_hf(sd, hf_cfg)[0], params)
  assert from_hf(sd, hf_cfg)[1] == got


# ----------------------------------------------------------------------------- zoo

# ResNet zoo entries have no HF form; tests/test_resnet.py checks their counts.
@pytest.mark.parametrize("name", sorted(n for n in zoo.ZOO if zoo.get(n).vision.kind == "vit"))
def test_zoo_configs_round_trip_and_match_pytorch_counts(name):
  cfg = zoo.get(name)
  params = zero_params(cfg)
  assert from_openai(to_open_clip(params, cfg), cfg.activation)[1] == cfg
  sd, hf_cfg = to_hf(params, cfg)
  assert from_hf(sd, hf_cfg)[1] == cfg
  del sd
  with torch.device("meta"):
    model = CLIPModel(HFConfig(**hf_cfg))
  count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())
  assert count_params(params["visual"]) == count(model.vision_model, model.visual_projection)
  assert count_params(params["text"]) == count(model.text_model, model.text_projection)


# ----------------------------------------------------------------------------- errors

def test_check_params_names_key_and_shapes():
  cfg = tiny()
  params = zero_params(cfg)
  flat = flatten(params)
  key = "visual/layers_1/attn/in_proj_kernel"
  missing = unflatten({k: v for k, v in flat.items() if k != key})
  with pytest.raises(CheckpointError, match=r"`visual/layers_1/attn/in_proj_kernel` is missing "
                     r"\(the config expects shape \(128, 3, 2, 64\), the checkpoint has none\)"):
    check_params(missing, cfg)
  extra = unflatten({**flat, "text/layers_0/attn/rel_bias": np.zeros((2, 5), np.float32)})
  with pytest.raises(CheckpointError, match=r"`text/layers_0/attn/rel_bias` with shape \(2, 5\) "
                     r"is not used .* shape None"):
    check_params(extra, cfg)
  wrong = unflatten({**flat, "text/token_embedding": np.zeros((51, 64), np.float32)})
  with pytest.raises(CheckpointError, match=r"`text/token_embedding` has shape \(51, 64\) but "
                     r"the config expects \(50, 64\)"):
    check_params(wrong, cfg)
  check_params(params, cfg)


def _resnet_sd():
  return {"visual.conv1.weight": np.zeros((32, 3, 3, 3)), "visual.layer1.0.conv1.weight":
          np.zeros((32, 32, 1, 1)), "visual.attnpool.positional_embedding": np.zeros((50, 2048)),
          "token_embedding.weight": np.zeros((10, 8))}


@pytest.mark.parametrize("sd, pattern", [
    (_resnet_sd(), "has exactly layer1..layer4"),
    ({"fc.weight": np.zeros((3, 4))}, r"not an OpenAI/open_clip CLIP ViT state dict: found `fc.weight`"),
    ({}, "found no keys at all"),
    ({"vision_model.embeddings.class_embedding": np.zeros(4)}, "convert it with `from_hf`"),
])
def test_from_openai_rejects_non_clip(sd, pattern):
  with pytest.raises(CheckpointError, match=pattern):
    from_openai(sd, "quick_gelu")


def test_from_openai_rejects_unknown_keys():
  cfg = tiny()
  sd = to_open_clip(zero_params(cfg), cfg)
  with pytest.raises(CheckpointError, match="`visual.transformer.resblocks.0.ls_1.gamma`"):
    from_openai({**sd, "visual.transformer.resblocks.0.ls_1.gamma": np.ones(128)}, "gelu")


def test_from_hf_rejects_bad_inputs():
  cfg = tiny()
  sd, hf_cfg = to_hf(zero_params(cfg), cfg)
  with pytest.raises(CheckpointError, match="not a Hugging Face CLIPModel"):
    from_hf(to_open_clip(zero_params(cfg), cfg), hf_cfg)
  bad = {**hf_cfg, "text_config": {**hf_cfg["text_config"], "hidden_act": "gelu_new"}}
  with pytest.raises(CheckpointError, match=r"hidden_act \['gelu_new', 'quick_gelu'\]"):
    from_hf(sd, bad)
  bad = {**hf_cfg, "vision_config": {**hf_cfg["vision_config"], "intermediate_size": 512}}
  with pytest.raises(CheckpointError, match="intermediate_size = 512 but the tensors say 96"):
    from_hf(sd, bad)
  bad = {**hf_cfg, "vision_config": {**hf_cfg["vision_config"], "num_attention_heads": 3}}
  with pytest.raises(CheckpointError, match="num_attention_heads = 3 does not divide"):
    from_hf(sd, bad)
  with pytest.raises(CheckpointError, match="`visual_projection.weight`.* is missing"):
    from_hf({k: v for k, v in sd.items() if k != "visual_projection.weight"}, hf_cfg)
