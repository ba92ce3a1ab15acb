"""Model structure tests. Numerical parity with PyTorch lives in test_convert_maps.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyclip_jax import models
from tinyclip_jax.models import CLIP, CLIPConfig, ConfigError, text_tower, vision_tower, zoo
from tinyclip_jax.models.clip import logical_axes


def tiny(activation="gelu", vheads=2, tmlp=96):
  return CLIPConfig(24, vision_tower(64, 2, 8, image_size=32, heads=vheads, mlp=128, head_dim=32),
                    text_tower(64, 2, heads=2, mlp=tmlp, head_dim=32, context_length=16,
                               vocab_size=100), activation=activation)


def inputs(cfg, b=3):
  rng = np.random.RandomState(0)
  img = rng.randn(b, cfg.vision.image_size, cfg.vision.image_size, 3).astype(np.float32)
  tok = rng.randint(1, cfg.text.vocab_size - 1, (b, cfg.text.context_length)).astype(np.int32)
  tok[:, 5] = cfg.text.vocab_size - 1
  return img, tok


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_names_match_parameter_counts(name):
  """TinyCLIP names count vision params and text params without the token embedding."""
  shapes = models.param_shapes(zoo.get(name))
  vis = models.count_params(shapes["visual"]) / 1e6
  txt = (models.count_params(shapes["text"]) - shapes["text"]["token_embedding"].size) / 1e6
  if name.startswith("TinyCLIP"):
    v_name = float(name.split("ViT-" if "ViT-" in name else "ResNet-")[1].split("M")[0])
    t_name = float(name.split("Text-")[1].split("M")[0])
    assert abs(vis - v_name) / v_name < 0.05, (vis, v_name)
    assert abs(txt - t_name) / t_name < 0.2, (txt, t_name)


def test_every_param_has_logical_axes():
  cfg = tiny()
  specs = logical_axes(cfg)
  shapes = models.param_shapes(cfg)
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  assert len(flat_specs) == len(flat_shapes)
  for (path, spec), (_, shape) in zip(flat_specs, flat_shapes):
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == len(shape.shape), (path, spec, shape.shape)


def test_encode_and_call_shapes_and_normalization():
  cfg = tiny()
  params = models.init_params(cfg, jax.random.key(0))
  img, tok = inputs(cfg)
  out = CLIP(cfg).apply({"params": params}, img, tok)
  assert out["image_embeds"].shape == (3, 24) and out["text_embeds"].shape == (3, 24)
  np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)


def test_remat_gives_same_outputs_and_grads():
  cfg = tiny()
  params = models.init_params(cfg, jax.random.key(0))
  img, tok = inputs(cfg)

  def loss(p, remat):
    out = CLIP(cfg, remat=remat).apply({"params": p}, img, tok)
    return jnp.sum(out["image_embeds"] @ out["text_embeds"].T)

  l0, g0 = jax.value_and_grad(loss)(params, False)
  l1, g1 = jax.value_and_grad(loss)(params, True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bfloat16_compute_stays_close_to_float32():
  cfg = tiny()
  params = models.init_params(cfg, jax.random.key(0))
  img, tok = inputs(cfg)
  f32 = CLIP(cfg).apply({"params": params}, img, tok)
  bf16 = CLIP(cfg, dtype=jnp.bfloat16).apply({"params": params}, img, tok)
  assert bf16["image_embeds"].dtype == jnp.float32
  cos = np.sum(np.asarray(f32["image_embeds"]) * np.asarray(bf16["image_embeds"]), -1)
  assert np.all(cos > 0.99), cos


def test_per_layer_widths_and_pruned_sublayers():
  cfg = CLIPConfig(24, vision_tower(64, 3, 8, image_size=32, heads=(2, 0, 1), mlp=(128, 64, 0),
                                    head_dim=32),
                   text_tower(64, 2, heads=(1, 2), mlp=(0, 32), head_dim=32, context_length=16,
                              vocab_size=100))
  shapes = models.param_shapes(cfg)
  v = shapes["visual"]
  assert v["layers_0"]["attn"]["in_proj_kernel"].shape == (64, 3, 2, 32)
  assert "attn" not in v["layers_1"] and "ln_1" not in v["layers_1"]
  assert v["layers_1"]["mlp"]["c_fc"]["kernel"].shape == (64, 64)
  assert "mlp" not in v["layers_2"] and "ln_2" not in v["layers_2"]
  assert "mlp" not in shapes["text"]["layers_0"]
  params = models.init_params(cfg, jax.random.key(1))
  out = CLIP(cfg).apply({"params": params}, *inputs(cfg))
  assert np.all(np.isfinite(out["image_embeds"]))


def test_config_json_round_trip_and_errors():
  cfg = tiny()
  assert CLIPConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(ConfigError, match="activation"):
    cfg.replace(activation="relu")
  with pytest.raises(ConfigError, match="multiple of patch_size"):
    vision_tower(64, 2, 7, image_size=32)
  with pytest.raises(ConfigError, match="unknown model"):
    zoo.get("ViT-Z-99")


def test_wrong_input_shapes_raise_clear_errors():
  cfg = tiny()
  params = models.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="NHWC"):
    CLIP(cfg).apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32),
                    method=CLIP.encode_image)
  with pytest.raises(ValueError, match="context"):
    CLIP(cfg).apply({"params": params}, np.zeros((1, 17), np.int32), method=CLIP.encode_text)
