"""Manual weight inheritance: against PyTorch slicing of a transformers CLIPModel,
on the zoo's teacher/student pairs (shapes only), errors, identity, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyclip_jax.inherit import InheritError, inherit, student_config_from, uniform_layer_indices
from tinyclip_jax.models import CLIP, CLIPConfig, param_shapes, text_tower, vision_tower, zoo

ACT = "quick_gelu"
VOCAB, CTX, IMG, PATCH = 100, 16, 32, 8


def hf_config(width, layers, heads, mlp, proj):
  transformers = pytest.importorskip("transformers")
  tower = dict(hidden_size=width, intermediate_size=mlp, num_attention_heads=heads,
               num_hidden_layers=layers, hidden_act=ACT)
  return transformers.CLIPConfig(
      text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=CTX,
                       eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=0),
      vision_config=dict(tower, image_size=IMG, patch_size=PATCH), projection_dim=proj)


def our_config(width, layers, heads, mlp, proj):
  return CLIPConfig(proj, vision_tower(width, layers, PATCH, image_size=IMG, heads=heads, mlp=mlp),
                    text_tower(width, layers, heads=heads, mlp=mlp, context_length=CTX,
                               vocab_size=VOCAB), activation=ACT)


def hf_to_params(model, cfg: CLIPConfig):
  """Canonical params of a transformers CLIPModel, via the package's converter."""
  from tinyclip_jax.convert.hf import from_hf
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params, got = from_hf(sd, model.config.to_dict())
  assert got == cfg, (got, cfg)
  return params


def torch_slice(sd_t, idx, w, h, m, e, d=64):
  """The student's HF state dict sliced from the teacher's with torch indexing:
  teacher layer idx[i] → student layer i; the first h heads of q, k, v (rows
  [:h*d]); the first w residual channels; the first m MLP units; the first e
  projection outputs. Written independently of the canonical layout."""
  out = {}
  for key, x in sd_t.items():
    if ".encoder.layers." in key:
      pre, rest = key.split(".encoder.layers.")
      j, sub = rest.split(".", 1)
      if int(j) not in idx:
        continue
      key = f"{pre}.encoder.layers.{idx.index(int(j))}.{sub}"
      if any(f"self_attn.{n}_proj.weight" in sub for n in "qkv"):
        x = x[:h * d, :w]
      elif any(f"self_attn.{n}_proj.bias" in sub for n in "qkv"):
        x = x[:h * d]
      elif "out_proj.weight" in sub:
        x = x[:w, :h * d]
      elif "fc1.weight" in sub:
        x = x[:m, :w]
      elif "fc1.bias" in sub:
        x = x[:m]
      elif "fc2.weight" in sub:
        x = x[:w, :m]
      else:  # fc2.bias, out_proj.bias, layer norms
        x = x[:w]
    elif key.endswith("projection.weight"):  # (E, W)
      x = x[:e, :w]
    elif key.endswith(("patch_embedding.weight", "class_embedding")) or "layrnorm" in key \
        or "layernorm" in key or "layer_norm" in key:
      x = x[:w]
    elif key.endswith(("position_embedding.weight", "token_embedding.weight")):
      x = x[:, :w]
    else:
      assert key == "logit_scale", key
    out[key] = x.clone()
  return out


@pytest.fixture(scope="module")
def hf_pair():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  teacher = transformers.CLIPModel(hf_config(128, 4, 2, 256, 32)).eval()
  with torch.no_grad():  # random LayerNorms too, so a wrong slice cannot hide behind ones/zeros
    for name, p in teacher.named_parameters():
      one = "norm" in name and name.endswith("weight")
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if one else 0.0))
  idx = uniform_layer_indices(4, 2)
  student = transformers.CLIPModel(hf_config(64, 2, 1, 128, 16)).eval()
  student.load_state_dict(torch_slice(teacher.state_dict(), idx, w=64, h=1, m=128, e=16),
                          strict=True)
  return teacher, student, idx


def _random_params(cfg, seed=0):
  """Random numpy params of cfg's shapes (faster than an eager Flax init)."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda x: np.asarray(rng.randn(*x.shape), np.float32),
                                param_shapes(cfg))


def test_uniform_layer_indices():
  assert uniform_layer_indices(4, 2) == [0, 2]
  assert uniform_layer_indices(12, 12) == list(range(12))
  assert uniform_layer_indices(12, 9) == list(range(9))        # k = 1
  assert uniform_layer_indices(12, 10) == list(range(10))      # k = 1
  assert uniform_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]   # k = 2
  assert uniform_layer_indices(12, 3) == [0, 4, 8]             # k = 4
  assert uniform_layer_indices(12, 5) == [0, 2, 4, 6, 8]       # k = 2, not spread to the end
  assert uniform_layer_indices(12, 0) == []
  with pytest.raises(InheritError, match="deeper"):
    uniform_layer_indices(12, 13)


def test_matches_torch_slicing(hf_pair):
  import torch
  teacher, student, idx = hf_pair
  assert idx == [0, 2]
  t_cfg, s_cfg = our_config(128, 4, 2, 256, 32), our_config(64, 2, 1, 128, 16)
  ours = inherit(hf_to_params(teacher, t_cfg), t_cfg, s_cfg)

  # Leaf by leaf: exactly the torch-sliced student, mapped to the canonical layout.
  ref = hf_to_params(student, s_cfg)
  flat_ours = jax.tree_util.tree_leaves_with_path(ours)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(ref)
  for (path, a), b in zip(flat_ours, jax.tree_util.tree_leaves(ref)):
    assert a.dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

  # Embeddings: the Flax student on inherited params vs the torch student.
  rng = np.random.RandomState(0)
  img = rng.randn(3, IMG, IMG, 3).astype(np.float32)
  tok = rng.randint(1, VOCAB - 2, (3, CTX))
  tok[:, 9], tok[:, 10:] = VOCAB - 1, 0  # EOT is the largest id, so argmax pooling agrees with HF
  model = CLIP(s_cfg)
  ji = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))(ours, img)
  jt = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_text))(
      ours, jnp.asarray(tok, jnp.int32))
  with torch.no_grad():
    ti = student.get_image_features(pixel_values=torch.tensor(img.transpose(0, 3, 1, 2)))
    tt = student.get_text_features(input_ids=torch.tensor(tok))
  ti = getattr(ti, "pooler_output", ti).numpy()
  tt = getattr(tt, "pooler_output", tt).numpy()
  di, dt = np.abs(np.asarray(ji) - ti).max(), np.abs(np.asarray(jt) - tt).max()
  print(f"max |flax - torch|: image {di:.2e}, text {dt:.2e} (scale {np.abs(ti).max():.2f})")
  assert di < 1e-5 and dt < 1e-5


PAIRS = [("ViT-B-16", "TinyCLIP-ViT-39M-16-Text-19M", list(range(12)), [0, 2, 4, 6, 8, 10]),
         ("ViT-B-16", "TinyCLIP-ViT-8M-16-Text-3M", list(range(10)), [0, 4, 8]),
         ("ViT-B-32", "TinyCLIP-ViT-61M-32-Text-29M", list(range(12)), list(range(9))),
         ("ViT-B-32", "TinyCLIP-ViT-40M-32-Text-19M", list(range(12)), [0, 2, 4, 6, 8, 10])]


def _tagged(shapes):
  """Zero-stride int8 stand-ins for a big teacher: every leaf of layers_j holds j + 1,
  everything else 0. No memory for the teacher; the student is int8 (dtype preserved)."""
  def tag(path, x):
    keys = [getattr(k, "key", None) for k in path]
    j = int(keys[1][7:]) + 1 if len(keys) > 2 and str(keys[1]).startswith("layers_") else 0
    return np.broadcast_to(np.int8(j), x.shape)
  return jax.tree_util.tree_map_with_path(tag, shapes)


@pytest.mark.parametrize("teacher_name,student_name,vision_idx,text_idx", PAIRS)
def test_zoo_students(teacher_name, student_name, vision_idx, text_idx):
  t, s = zoo.get(teacher_name), zoo.get(student_name)
  t_shapes = param_shapes(t)
  out = jax.eval_shape(lambda p: inherit(p, t, s), t_shapes)
  want = param_shapes(s)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(want)
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(out),
                                                 jax.tree_util.tree_leaves(want)))
  # Which teacher layer each student layer came from.
  assert uniform_layer_indices(t.vision.layers, s.vision.layers) == vision_idx
  assert uniform_layer_indices(t.text.layers, s.text.layers) == text_idx
  got = inherit(_tagged(t_shapes), t, s)
  for key, idx in (("visual", vision_idx), ("text", text_idx)):
    for i, j in enumerate(idx):
      leaves = jax.tree_util.tree_leaves(got[key][f"layers_{i}"])
      assert all(x.dtype == np.int8 and (x == j + 1).all() for x in leaves), (key, i, j)
  assert (got["visual"]["proj"] == 0).all()
  # The zoo students are exactly what student_config_from makes of their teachers.
  assert student_config_from(t, vision_width=s.vision.width, vision_layers=s.vision.layers,
                             text_width=s.text.width, text_layers=s.text.layers) == s


def test_layer_indices_override():
  t, s = our_config(128, 4, 2, 256, 32), our_config(64, 2, 1, 128, 16)
  got = inherit(_tagged(param_shapes(t)), t, s, layer_indices={"visual": [1, 3]})
  assert (got["visual"]["layers_0"]["ln_1"]["scale"] == 2).all()
  assert (got["visual"]["layers_1"]["ln_1"]["scale"] == 4).all()
  assert (got["text"]["layers_1"]["ln_1"]["scale"] == 3).all()  # uniform: 0, 2
  for bad in ({"visual": [0]}, {"visual": [3, 1]}, {"visual": [0, 4]}, {"vision": [0, 1]}):
    with pytest.raises(InheritError, match="layer_indices"):
      inherit(_tagged(param_shapes(t)), t, s, layer_indices=bad)


def test_pruned_layers():
  """Per-layer widths, including sub-layers pruned away (heads 0 / mlp 0)."""
  t = CLIPConfig(32, vision_tower(128, 4, PATCH, image_size=IMG, heads=(2, 0, 2, 2),
                                  mlp=(256, 256, 0, 256)),
                 text_tower(128, 2, heads=2, mlp=256, context_length=CTX, vocab_size=VOCAB))
  s = CLIPConfig(16, vision_tower(64, 3, PATCH, image_size=IMG, heads=(1, 0, 0), mlp=(64, 0, 128)),
                 text_tower(64, 2, heads=(0, 1), mlp=(128, 0), context_length=CTX,
                            vocab_size=VOCAB))
  tp = _random_params(t, 1)
  got = inherit(tp, t, s, layer_indices={"visual": [0, 2, 3]})
  shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)  # noqa: E731
  assert shapes(got) == shapes(param_shapes(s))
  assert "layers_1" not in got["visual"]  # fully pruned: a layer without params
  assert "attn" not in got["text"]["layers_0"] and "mlp" not in got["text"]["layers_1"]
  np.testing.assert_array_equal(got["visual"]["layers_0"]["attn"]["in_proj_kernel"],
                                tp["visual"]["layers_0"]["attn"]["in_proj_kernel"][:64, :, :1])
  np.testing.assert_array_equal(got["visual"]["layers_2"]["mlp"]["c_fc"]["kernel"],
                                tp["visual"]["layers_3"]["mlp"]["c_fc"]["kernel"][:64, :128])
  # A student attention layer cannot come from a teacher layer whose attention is pruned.
  with pytest.raises(InheritError, match="vision layer 1 has heads 1 but teacher vision layer 1"):
    inherit(tp, t, s.replace(vision=vision_tower(64, 3, PATCH, image_size=IMG, heads=1, mlp=64)),
            layer_indices={"visual": [0, 1, 3]})


def _vit(*a, **kw):
  return lambda t: t.replace(vision=vision_tower(*a, **kw))


def _txt(*a, **kw):
  return lambda t: t.replace(text=text_tower(*a, **kw))


@pytest.mark.parametrize("change,match", [
    (_vit(1024, 12, 16), "vision width 1024 exceeds teacher vision width 768"),
    (_txt(512, 13, heads=8), "text layers 13 exceeds teacher text layers 12"),
    (_vit(768, 12, 32), "vision patch_size 32 differs"),
    (_vit(768, 12, 16, image_size=256), "vision image_size 256 differs"),
    (_txt(512, 12, heads=8, context_length=64), "text context_length 64 differs"),
    (_txt(512, 12, heads=8, vocab_size=1000), "text vocab_size 1000 differs"),
    (_txt(512, 12, heads=16, head_dim=32), "text head_dim 32 differs"),
    (lambda t: t.replace(embed_dim=768), "embed_dim 768 exceeds"),
    (_vit(768, 12, 16, mlp=4096),
     "vision layer 0 mlp 4096 exceeds teacher vision layer 0 mlp 3072"),
    (_vit(512, 6, 16, heads=(8,) * 5 + (13,)),
     "vision layer 5 heads 13 exceeds teacher vision layer 10 heads 12"),
])
def test_errors(change, match):
  t = zoo.get("ViT-B-16")
  with pytest.raises(InheritError, match=match):  # configs are checked before any params
    inherit({}, t, change(t))


def test_teacher_params_must_match_teacher_config():
  t = our_config(128, 4, 2, 256, 32)
  tp = param_shapes(t)
  with pytest.raises(InheritError, match="lack"):
    inherit(param_shapes(our_config(128, 3, 2, 256, 32)), t, t)
  tp["text"]["token_embedding"] = jax.ShapeDtypeStruct((VOCAB, 64), jnp.float32)
  with pytest.raises(InheritError, match="text/token_embedding has shape"):
    inherit(tp, t, t)


def test_identity_jit_and_dtypes():
  t = our_config(128, 4, 2, 256, 32)
  tp = _random_params(t)
  same = inherit(tp, t, t)
  assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(tp)
  jax.tree_util.tree_map(np.testing.assert_array_equal, same, tp)
  same["visual"]["proj"][0, 0] += 1  # a copy: the teacher is untouched
  assert tp["visual"]["proj"][0, 0] != same["visual"]["proj"][0, 0]

  s = our_config(64, 2, 1, 128, 16)
  eager = inherit(tp, t, s)
  jitted = jax.jit(lambda p: inherit(p, t, s))(tp)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jitted, eager)
  bf16 = inherit(jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tp), t, s)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16))
