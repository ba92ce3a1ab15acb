"""ResNet CLIP towers against an independent PyTorch ModifiedResNet (tests/resnet_reference.py):
zoo sizes, conversion from state dicts and TorchScript archives with BatchNorm running
statistics, open_clip export with strict loading, BatchNorm in training mode, manual
inheritance, and bad input."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from tests.resnet_reference import CLIP as TorchCLIP, randomize
from tinyclip_jax.convert import __main__ as convert_cli
from tinyclip_jax.convert import io
from tinyclip_jax.convert.common import CheckpointError, check_params, flatten, unflatten
from tinyclip_jax.convert.hf import to_hf
from tinyclip_jax.convert.openai import from_openai, to_open_clip
from tinyclip_jax.inherit.manual import InheritError, inherit, uniform_layer_indices
from tinyclip_jax.models import (CLIP, CLIPConfig, ConfigError, VisionConfig, count_params,
                                 merge_stats, param_shapes, resnet_tower, split_stats, text_tower,
                                 variables, zoo)
from tinyclip_jax.models.config import vision_tower

ZOO_RESNETS = ("RN50", "RN101", "TinyCLIP-ResNet-30M-Text-29M", "TinyCLIP-ResNet-19M-Text-19M")
TEXT = dict(context_length=8, vocab_size=100)
# Two blocks in stages 1 and 3 so the interval rule and non-first blocks are exercised;
# 64 px gives a 2×2 map for the attention pool (8 heads over 512 channels).
TEACHER = CLIPConfig(
    24,
    resnet_tower(16, (2, 1, 3, 1), image_size=64),
    text_tower(128, 2, heads=2, **TEXT),
    activation="quick_gelu")
STUDENT = CLIPConfig(
    16,
    resnet_tower(8, (1, 1, 2, 1), image_size=64),
    text_tower(64, 1, heads=1, **TEXT),
    activation="quick_gelu")
BATCH = 3


def torch_model(config, seed=0):
  torch.manual_seed(seed)
  return randomize(TorchCLIP.from_config(config), seed)


def numpy_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, 64, 64, 3)).astype(np.float32)  # NHWC
  tokens = rng.integers(1, TEXT["vocab_size"], size=(BATCH, TEXT["context_length"]))
  tokens[np.arange(BATCH), [3, 5, 7]] = TEXT["vocab_size"] - 1  # the end of text: pooled there
  return images, tokens.astype(np.int32)


@pytest.fixture(scope="module")
def teacher():
  model = torch_model(TEACHER)
  weights, config = from_openai(numpy_sd(model), "quick_gelu")
  return model, weights, config


@pytest.fixture(scope="module")
def encoders():
  """Jitted eval-mode encoders of the teacher config (compiled once for the module)."""
  model = CLIP(TEACHER)
  img = jax.jit(lambda w, x: model.apply(variables(w), x, method=CLIP.encode_image))
  txt = jax.jit(lambda w, t: model.apply(variables(w), t, method=CLIP.encode_text))
  return img, txt


def torch_embeds(model, images, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy(),
            model.encode_text(torch.from_numpy(tokens).long()).numpy())


def assert_embeds_equal(got, want):
  for g, w in zip(got, want):
    # 1e-5 relative to the embedding's scale (unnormalized outputs are O(1..10)).
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max())


# ----------------------------------------------------------------------------- model


def test_zoo_parameter_counts_equal_torch_modules():
  """Params + running statistics per tower equal the PyTorch module's state dict (minus
  num_batches_tracked), built on the meta device."""
  for name in ZOO_RESNETS:
    config = zoo.get(name)
    with torch.device("meta"):
      ref = TorchCLIP.from_config(config)
    shapes = param_shapes(config)
    want_visual = sum(v.numel()
                      for k, v in ref.visual.state_dict().items()
                      if not k.endswith("num_batches_tracked"))
    want_all = sum(
        v.numel() for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert count_params(shapes["visual"]) == want_visual, name
    assert count_params(shapes) == want_all, name
    trainable, _ = split_stats(shapes)
    assert count_params(trainable) == sum(p.numel() for p in ref.parameters()), name
  # The TinyCLIP names count the image tower's trainable parameters.
  visual = {
      n: count_params(split_stats(param_shapes(zoo.get(n)))[0]["visual"]) / 1e6
      for n in ZOO_RESNETS[2:]
  }
  assert round(visual["TinyCLIP-ResNet-30M-Text-29M"]) == 30
  assert round(visual["TinyCLIP-ResNet-19M-Text-19M"]) == 19


def test_config_json_round_trip_and_old_json_is_a_vit():
  for config in (TEACHER, zoo.get("RN101")):
    assert CLIPConfig.from_json(config.to_json()) == config
  vit = zoo.get("ViT-B-32")
  old = vit.to_dict()
  for field in ("kind", "stages"):  # configs written before ResNet towers existed
    del old["vision"][field]
  assert CLIPConfig.from_dict(old) == vit


@pytest.mark.parametrize("kw, pattern", [
    (dict(kind="resnet", stages=(3, 4, 6)), r"stages \[3, 4, 6\] must be 4 positive"),
    (dict(kind="resnet", stages=(3, 4, 6, 3), heads=(1,), mlp=(4,)), "leave heads and mlp empty"),
    (dict(kind="resnet", stages=(3, 4, 6, 3), patch_size=16), "patch_size 32"),
    (dict(kind="vit", stages=(3, 4, 6, 3), heads=(1,), mlp=(4,)), "describe ResNet towers only"),
    (dict(kind="convnext", heads=(1,), mlp=(4,)), "kind 'convnext' is unknown"),
])
def test_bad_vision_configs_are_one_sentence(kw, pattern):
  kw = {"width": 64, "heads": (), "mlp": (), "image_size": 224, "patch_size": 32, **kw}
  with pytest.raises(ConfigError, match=pattern):
    VisionConfig(**kw)


def test_logical_axes_cover_every_weight():
  from tinyclip_jax.models.clip import logical_axes
  axes = flatten(logical_axes(STUDENT))
  shapes = flatten(param_shapes(STUDENT))
  assert axes.keys() == shapes.keys()
  assert tuple(axes["visual/layer1_0/conv2/kernel"]) == (None, None, None, "embed")
  assert tuple(axes["visual/bn1/scale"]) == ("embed",)
  assert tuple(axes["visual/attnpool/q_proj/kernel"]) == ("embed", "mlp")
  assert tuple(axes["visual/bn1/mean"]) == ()  # running statistics are replicated


# ----------------------------------------------------------------------------- conversion


def test_converted_embeddings_equal_torch_in_eval_mode(teacher, encoders, inputs):
  model, weights, config = teacher
  assert config == TEACHER
  assert float(np.abs(weights["visual"]["bn1"]["mean"]).max()) > 0.1  # really randomized
  images, tokens = inputs
  got = encoders[0](weights, images), encoders[1](weights, tokens)
  assert_embeds_equal(got, torch_embeds(model, images, tokens))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torchscript_archive_converts(teacher, encoders, inputs, tmp_path):
  """OpenAI ships RN checkpoints as TorchScript archives: read through the restricted
  unpickler, BatchNorm buffers included, with OpenAI's extra non-tensor attributes."""
  model, weights, _ = teacher
  images, tokens = inputs
  path = tmp_path / "RN-tiny.pt"
  example = torch.from_numpy(images.transpose(0, 3, 1, 2))
  traced = torch.jit.trace_module(model, {"encode_image": example})
  traced.save(str(path))
  sd = io.read_state_dict(path)
  assert "visual.layer1.0.bn1.running_var" in sd
  got_weights, config = from_openai(sd, "quick_gelu")
  assert config == TEACHER
  for k, v in flatten(weights).items():
    np.testing.assert_array_equal(flatten(got_weights)[k], v, err_msg=k)


def test_open_clip_export_loads_strict_and_matches(teacher, inputs):
  model, weights, config = teacher
  sd = to_open_clip(weights, config)
  fresh = TorchCLIP.from_config(config)
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
  fresh.eval()
  images, tokens = inputs
  for g, w in zip(torch_embeds(fresh, images, tokens), torch_embeds(model, images, tokens)):
    np.testing.assert_array_equal(g, w)
  assert sd["visual.layer1.0.bn1.num_batches_tracked"].dtype == np.int64
  # Round trip: bit-exact.
  back, config2 = from_openai(sd, "quick_gelu")
  assert config2 == config
  for k, v in flatten(weights).items():
    np.testing.assert_array_equal(flatten(back)[k], v, err_msg=k)


def test_train_mode_batch_norm_equals_torch(teacher, inputs):
  """train=True: outputs normalized with the batch's statistics and running statistics
  updated with PyTorch's momentum 0.1. PyTorch updates the running variance with the
  unbiased batch variance (× n/(n−1), n = batch·height·width); flax with the biased
  one, so the test undoes that factor per BatchNorm."""
  model, weights, config = teacher
  images, _ = inputs
  sizes = {}
  hooks = [
      m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(
          name, inp[0].shape[0] * inp[0].shape[2] * inp[0].shape[3]))
      for name, m in model.named_modules()
      if isinstance(m, torch.nn.BatchNorm2d)
  ]
  before = numpy_sd(model)
  model.train()
  try:
    with torch.no_grad():
      want = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    after = numpy_sd(model)
  finally:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
    model.eval()
    for h in hooks:
      h.remove()
  params, stats = split_stats(weights)
  got, new = CLIP(config).apply({
      "params": params,
      "batch_stats": stats
  },
                                images,
                                train=True,
                                mutable=["batch_stats"],
                                method=CLIP.encode_image)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
  new_flat = flatten(new["batch_stats"])
  for torch_name, path in _bn_modules(config):
    n = sizes[torch_name]
    mean = new_flat[f"{path}/mean"]
    np.testing.assert_allclose(mean, after[f"{torch_name}.running_mean"], rtol=1e-5, atol=1e-6)
    old = before[f"{torch_name}.running_var"]
    biased = (after[f"{torch_name}.running_var"] - 0.9 * old) / 0.1 * (n - 1) / n
    np.testing.assert_allclose(
        new_flat[f"{path}/var"], 0.9 * old + 0.1 * biased, rtol=1e-5, atol=1e-6, err_msg=torch_name)


def _bn_modules(config):
  """(torch BatchNorm module name, canonical path) of every BatchNorm."""
  from tinyclip_jax.convert.resnet import vision_entries
  for key, path, _ in vision_entries(config):
    if key.endswith(".running_mean"):
      yield key[:-len(".running_mean")], path[:-len("/mean")]


# ----------------------------------------------------------------------------- CLI


def test_cli_converts_and_refuses_hf_export(teacher, tmp_path, capsys):
  model, weights, _ = teacher
  src = tmp_path / "rn.pt"
  torch.save(model.state_dict(), src)
  flax_dir = tmp_path / "flax"
  assert convert_cli.main([f"--src=openai:{src}", f"--dst=flax:{flax_dir}"]) == 0
  assert "ResNet stages [2, 1, 3, 1] x width 16" in capsys.readouterr().out
  out = tmp_path / "rn.safetensors"
  assert convert_cli.main([f"--src=flax:{flax_dir}", f"--dst=open_clip:{out}"]) == 0
  sd = io.read_state_dict(out)
  fresh = TorchCLIP.from_config(TEACHER)
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
  np.testing.assert_array_equal(sd["visual.layer3.2.bn2.running_var"],
                                model.state_dict()["visual.layer3.2.bn2.running_var"].numpy())
  capsys.readouterr()
  hf_dir = tmp_path / "hf"
  assert convert_cli.main([f"--src=flax:{flax_dir}", f"--dst=hf:{hf_dir}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "has no ResNet image tower" in err and "--dst=open_clip:" in err
  assert len(err.splitlines()) == 1
  assert not hf_dir.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("hf")]


# ----------------------------------------------------------------------------- bad input


def test_resnet_weights_with_a_vit_config_and_the_reverse(teacher):
  _, weights, config = teacher
  vit = CLIPConfig(24, vision_tower(64, 1, 32, image_size=64), config.text, "quick_gelu")
  with pytest.raises(
      CheckpointError,
      match="^the weights have a ResNet image tower but the "
      "config describes a ViT one; pair"):
    check_params(weights, vit)
  vit_weights = jax.tree.map(np.zeros_like, param_shapes(vit))
  with pytest.raises(
      CheckpointError, match="have a ViT image tower but the config describes "
      "a ResNet"):
    check_params(vit_weights, config)
  other = config.replace(vision=resnet_tower(16, (2, 1, 2, 1), image_size=64))
  with pytest.raises(
      CheckpointError, match=r"ResNet stages \[2, 1, 3, 1\] but the config says "
      r"\[2, 1, 2, 1\]"):
    check_params(weights, other)


def test_state_dict_with_a_missing_stage_or_block(teacher):
  model, _, _ = teacher
  sd = numpy_sd(model)
  no_stage4 = {k: v for k, v in sd.items() if not k.startswith("visual.layer4.")}
  with pytest.raises(
      CheckpointError,
      match=r"N in \[1, 2, 3\] but OpenAI's modified ResNet "
      "has exactly layer1..layer4"):
    from_openai(no_stage4, "quick_gelu")
  no_block = {k: v for k, v in sd.items() if not k.startswith("visual.layer3.1.")}
  with pytest.raises(CheckpointError, match=r"block\(s\) \[1\] are absent"):
    from_openai(no_block, "quick_gelu")
  with pytest.raises(CheckpointError, match="`visual.layer1.0.se.weight`"):
    from_openai({**sd, "visual.layer1.0.se.weight": np.zeros(3)}, "quick_gelu")


def test_hf_export_of_a_resnet_is_refused(teacher):
  _, weights, config = teacher
  with pytest.raises(CheckpointError, match="Hugging Face CLIPModel has no ResNet image tower"):
    to_hf(weights, config)


# ----------------------------------------------------------------------------- inheritance


def torch_inherit(teacher_sd, student_sd, teacher_cfg, student_cfg):
  """TinyCLIP's rule spelled out on PyTorch tensors: per stage (and for the text
  transformer) blocks by the interval rule, then every tensor's leading corner, with
  the fused qkv viewed as (3, heads, 64, in)."""
  out = {}
  for key, like in student_sd.items():
    parts = key.split(".")
    if key.startswith("visual.layer"):
      s = int(parts[1][5:])
      idx = uniform_layer_indices(teacher_cfg.vision.stages[s - 1],
                                  student_cfg.vision.stages[s - 1])
      parts[2] = str(idx[int(parts[2])])
    elif key.startswith("transformer.resblocks."):
      parts[2] = str(
          uniform_layer_indices(teacher_cfg.text.layers, student_cfg.text.layers)[int(parts[2])])
    src = teacher_sd[".".join(parts)]
    if like.ndim == 0:
      out[key] = src
    elif key.endswith("attn.in_proj_weight"):
      sh, th = like.shape[0] // 192, src.shape[0] // 192
      out[key] = src.view(3, th, 64, -1)[:, :sh, :, :like.shape[1]].reshape(like.shape)
    elif key.endswith("attn.in_proj_bias"):
      out[key] = src.view(3, -1, 64)[:, :like.shape[0] // 192].reshape(-1)
    else:
      out[key] = src[tuple(slice(0, n) for n in like.shape)]
  return out


def test_inheritance_equals_torch_slicing(teacher):
  model, weights, config = teacher
  with torch.device("meta"):
    student_sd = TorchCLIP.from_config(STUDENT).state_dict()
  want = torch_inherit(model.state_dict(), student_sd, TEACHER, STUDENT)
  got = to_open_clip(inherit(weights, config, STUDENT), STUDENT)
  assert got.keys() == want.keys()
  for k, v in want.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
  # Stage 3 keeps teacher blocks 0 and 1 (3 // 2 = 1); stage 1 keeps block 0 only.
  np.testing.assert_array_equal(
      got["visual.layer3.1.bn1.running_mean"],
      model.state_dict()["visual.layer3.1.bn1.running_mean"][:32].numpy())  # 4 × width 8


def test_inheritance_under_jit_keeps_shapes(teacher):
  _, weights, config = teacher
  out = jax.eval_shape(lambda w: inherit(w, config, STUDENT), weights)
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape,
                                                              param_shapes(STUDENT))


@pytest.mark.parametrize("student, pattern", [
    (STUDENT.replace(vision=vision_tower(64, 1, 32, image_size=64)),
     "the teacher's image tower is a resnet and the student's a vit"),
    (STUDENT.replace(vision=resnet_tower(32, (1, 1, 1, 1), image_size=64)),
     "student vision width 32 exceeds teacher vision width 16"),
    (STUDENT.replace(vision=resnet_tower(8, (1, 2, 1, 1), image_size=64)),
     "student ResNet stage 2 has 2 blocks but the teacher's has 1"),
    (STUDENT.replace(vision=resnet_tower(8, (1, 1, 1, 1), image_size=96)), "image_size 96 differs"),
])
def test_inheritance_refuses_what_slicing_cannot_do(teacher, student, pattern):
  _, weights, config = teacher
  with pytest.raises(InheritError, match=pattern):
    inherit(weights, config, student)


def test_split_and_merge_of_running_statistics_are_inverse():
  weights = flatten(jax.tree.map(lambda x: np.zeros(x.shape), param_shapes(STUDENT)))
  params, stats = split_stats(unflatten(weights))
  assert set(flatten(stats)) == {k for k in weights if k.endswith(("/mean", "/var"))}
  assert set(flatten(params)) == {k for k in weights if not k.endswith(("/mean", "/var"))}
  assert set(flatten(merge_stats(params, stats))) == set(weights)
  vit = CLIPConfig(16, vision_tower(64, 1, 32, image_size=64), STUDENT.text)
  assert split_stats(param_shapes(vit))[1] is None
