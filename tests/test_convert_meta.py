"""What tensor shapes cannot say survives every export and import (issue 14): the
activation, head sizes, per-layer widths and the end-of-text id the text is pooled
at. Round trips flax -> hf/open_clip/tinyclip -> flax through the CLI; imports of
80-channel heads from every source kind checked against transformers' CLIPModel;
pooling with an added token (id 49408) checked against transformers and a torch
spelling; and the refusals and warnings when nothing records a fact."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig as HFConfig  # noqa: E402
from transformers import CLIPModel  # noqa: E402

from torch_reference import CLIP as TorchCLIP  # noqa: E402
from tinyclip_jax import model_io  # noqa: E402
from tinyclip_jax.convert import CheckpointError, flatten, from_hf, meta, to_hf  # noqa: E402
from tinyclip_jax.convert import pad, sidecar, unflatten  # noqa: E402
from tinyclip_jax.convert.__main__ import main  # noqa: E402
from tinyclip_jax.convert.io import read_state_dict, write_safetensors_atomic  # noqa: E402
from tinyclip_jax.models import CLIP, CLIPConfig, ConfigError, param_shapes, zoo  # noqa: E402
from tinyclip_jax.models import resnet_tower, text_tower, vision_tower  # noqa: E402

TOL = 1e-5
ADDED = 49408  # one token added to CLIP's vocabulary (ids 0..49407, end of text 49407)
# Each differs from OpenAI's ViT-B/32 in some of the facts; together in all of them.
UNIFORM = CLIPConfig(24, vision_tower(64, 2, 8, image_size=32, mlp=96, head_dim=32),
                     text_tower(48, 2, heads=3, head_dim=16, mlp=80, context_length=12,
                                vocab_size=ADDED + 1), activation="quick_gelu")
PRUNED = CLIPConfig(16, vision_tower(64, 3, 16, image_size=48, heads=(2, 0, 1),
                                     mlp=(96, 40, 0), head_dim=32),
                    text_tower(40, 2, heads=(2, 1), mlp=(0, 50), head_dim=20, context_length=10,
                               vocab_size=60, eot_token_id=5))
RESNET = CLIPConfig(16, resnet_tower(16, (1, 1, 1, 1), image_size=64, head_dim=32),
                    text_tower(32, 1, heads=2, head_dim=16, mlp=40, context_length=8,
                               vocab_size=60), activation="quick_gelu")
# Hugging Face's CLIPModel has no ResNet image tower (--dst=hf refuses it).
CONFIGS = {"hf": {"uniform": UNIFORM, "pruned": PRUNED},
           "open_clip": {"uniform": UNIFORM, "pruned": PRUNED, "resnet": RESNET},
           "tinyclip": {"uniform": UNIFORM, "pruned": PRUNED, "resnet": RESNET}}
NOT_IN_HF = {"vision.kind", "vision.stages"}


def random_params(cfg, seed=0):
  rng = np.random.RandomState(seed)
  def leaf(path, shape):
    x = np.float32(0.05) * np.asarray(rng.randn(*shape), np.float32)
    return np.abs(x) + np.float32(1) if path.endswith(("/scale", "/var")) else x
  return unflatten({k: leaf(k, v.shape) for k, v in flatten(param_shapes(cfg)).items()})


def assert_trees_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


def _fields(cfg):
  return {k.replace("/", "."): v for k, v in flatten(cfg.to_dict()).items()}


@functools.lru_cache(maxsize=None)
def _encoders(cfg):
  model = CLIP(cfg)
  image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))
  text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIP.encode_text))
  return image, text


def flax_features(params, cfg, img, tok):
  image, text = _encoders(cfg)
  return np.asarray(image(params, img)), np.asarray(text(params, tok))


def _assumptions(caplog):
  return [r.getMessage() for r in caplog.records if "assumed" in r.getMessage()]


# ----------------------------------------------------------------------------- kind 1: round trips


@pytest.mark.parametrize("dst", sorted(CONFIGS))
def test_the_configs_differ_from_the_defaults_in_every_field(dst):
  """The round trip below covers every field of CLIPConfig (a new field fails here)."""
  base = _fields(zoo.get("ViT-B-32"))
  covered = {k for cfg in CONFIGS[dst].values() for k, v in _fields(cfg).items() if base[k] != v}
  assert set(base) - covered == (NOT_IN_HF if dst == "hf" else set())


@pytest.mark.parametrize("dst", sorted(CONFIGS))
def test_every_fact_survives_flax_to_each_destination_and_back(dst, tmp_path, caplog):
  for seed, (name, cfg) in enumerate(CONFIGS[dst].items()):
    params = random_params(cfg, seed)
    model_io.save_model(tmp_path / name / "src", params, cfg)
    out = tmp_path / name / ("hf" if dst == "hf" else "model.safetensors")
    assert main([f"--src=flax:{tmp_path / name / 'src'}", f"--dst={dst}:{out}"]) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert main([f"--src={dst}:{out}", f"--dst=flax:{tmp_path / name / 'back'}"]) == 0
    assert _assumptions(caplog) == [], name  # everything was read, nothing assumed
    back, back_cfg = model_io.load_model(tmp_path / name / "back")
    assert back_cfg == cfg, name
    assert_trees_equal(back, params)


def test_open_clip_config_builds_what_the_model_computes(tmp_path):
  """open_clip's CLIP built from the written model_cfg's fields (heads = width //
  head_width, mlp = int(width * mlp_ratio), QuickGELU, pool 'eos' at eos_id) loads the
  weights strictly and computes the model's embeddings, with an added token in the text."""
  params = random_params(UNIFORM, 3)
  model_io.save_model(tmp_path / "src", params, UNIFORM)
  assert main([f"--src=flax:{tmp_path / 'src'}", f"--dst=open_clip:{tmp_path / 'm.pt'}"]) == 0
  doc = json.loads((tmp_path / "open_clip_config.json").read_text())
  cfg, v, t = doc["model_cfg"], doc["model_cfg"]["vision_cfg"], doc["model_cfg"]["text_cfg"]
  assert (cfg["quick_gelu"], v["head_width"], t["heads"], t["pool_type"], t["eos_id"]) == (
      True, 32, 3, "eos", 49407)
  ref = TorchCLIP(cfg["embed_dim"], v["image_size"], v["patch_size"], v["width"], v["layers"],
                  v["width"] // v["head_width"], int(v["width"] * v["mlp_ratio"]),
                  t["context_length"], t["vocab_size"], t["width"], t["layers"], t["heads"],
                  int(t["width"] * t["mlp_ratio"]), quick_gelu=cfg["quick_gelu"],
                  eot_token_id=t["eos_id"]).eval()
  weights = read_state_dict(tmp_path / "m.pt")
  ref.load_state_dict({k: torch.from_numpy(x) for k, x in weights.items()}, strict=True)
  img = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  tok = np.zeros((2, 12), np.int32)
  tok[0, :6] = [49406, 320, ADDED, 1125, 49407, 0]  # the largest id: argmax would pool at 2
  tok[1, :4] = [49406, 1125, 49407, 49407]
  with torch.no_grad():
    want_i = ref.encode_image(torch.from_numpy(img.transpose(0, 3, 1, 2))).numpy()
    want_t = ref.encode_text(torch.from_numpy(tok).long()).numpy()
  got_i, got_t = flax_features(params, UNIFORM, img, tok)
  assert np.abs(got_i - want_i).max() < TOL and np.abs(got_t - want_t).max() < TOL


def test_a_second_model_in_the_same_folder_is_refused(tmp_path, capsys):
  for name, cfg in (("a", UNIFORM), ("b", PRUNED)):
    model_io.save_model(tmp_path / name, random_params(cfg), cfg)
  assert main([f"--src=flax:{tmp_path / 'a'}", f"--dst=open_clip:{tmp_path / 'x' / 'a.pt'}"]) == 0
  assert main([f"--src=flax:{tmp_path / 'a'}", f"--dst=tinyclip:{tmp_path / 'x' / 'a.bin'}"]) == 0
  capsys.readouterr()
  assert main([f"--src=flax:{tmp_path / 'b'}", f"--dst=open_clip:{tmp_path / 'x' / 'b.pt'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "describes another model" in err and "--overwrite" in err
  assert sorted(os.listdir(tmp_path / "x")) == ["a.bin", "a.pt", "open_clip_config.json"]


# ----------------------------------------------------------------------------- kind 1: imports

HEADS80 = dict(hidden_size=160, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
               hidden_act="quick_gelu")  # 2 heads of 80 channels: not a multiple of 64


@pytest.fixture(scope="module")
def heads80(tmp_path_factory):
  """A random HF CLIPModel with 80-channel heads in both towers, its folder, the same
  weights in OpenAI's layout (spelled out here), inputs and its features."""
  d = tmp_path_factory.mktemp("heads80")
  hf_cfg = HFConfig(projection_dim=24,
                    vision_config=dict(HEADS80, image_size=32, patch_size=16),
                    text_config=dict(HEADS80, vocab_size=100, max_position_embeddings=8,
                                     eos_token_id=99, bos_token_id=98, pad_token_id=1))
  torch.manual_seed(0)
  model = CLIPModel(hf_cfg).eval()
  with torch.no_grad():  # LayerNorm 1/0 and zero biases would hide mix-ups
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(d / "hf")
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  rng = np.random.RandomState(0)
  img = rng.randn(2, 32, 32, 3).astype(np.float32)
  tok = rng.randint(1, 98, (2, 8)).astype(np.int32)
  tok[0, 3], tok[1, 6:] = 99, 99
  with torch.no_grad():
    feats = (model.get_image_features(pixel_values=torch.from_numpy(img.transpose(0, 3, 1, 2))),
             model.get_text_features(input_ids=torch.from_numpy(tok).long()))
  feats = [(f.pooler_output if hasattr(f, "pooler_output") else f).numpy() for f in feats]
  return d, openai_layout(sd), img, tok, feats


def openai_layout(sd):
  """HF CLIPModel tensors under OpenAI's names: q, k, v fused, projections transposed."""
  out = {"logit_scale": sd["logit_scale"]}
  for hf, oa, tower in (("vision_model.", "visual.", "visual.transformer.resblocks."),
                        ("text_model.", "", "transformer.resblocks.")):
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(hf + "encoder.layers."))
    for i in range(n):
      src, dst = f"{hf}encoder.layers.{i}.", f"{tower}{i}."
      for w in ("weight", "bias"):
        out[f"{dst}attn.in_proj_{w}"] = np.concatenate(
            [sd[f"{src}self_attn.{p}_proj.{w}"] for p in "qkv"])
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
          out[f"{dst}{b}.{w}"] = sd[f"{src}{a}.{w}"]
  e = "vision_model.embeddings."
  out.update({"visual.conv1.weight": sd[e + "patch_embedding.weight"],
              "visual.class_embedding": sd[e + "class_embedding"],
              "visual.positional_embedding": sd[e + "position_embedding.weight"],
              "visual.proj": sd["visual_projection.weight"].T.copy(),
              "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
              "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
              "text_projection": sd["text_projection.weight"].T.copy()})
  for hf, oa in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                 ("vision_model.post_layernorm", "visual.ln_post"),
                 ("text_model.final_layer_norm", "ln_final")):
    out[oa + ".weight"], out[oa + ".bias"] = sd[hf + ".weight"], sd[hf + ".bias"]
  return out


def _check_heads80(out_dir, heads80):
  _, _, img, tok, (want_i, want_t) = heads80
  params, cfg = model_io.load_model(out_dir)
  assert (cfg.vision.heads, cfg.vision.head_dim, cfg.text.heads, cfg.text.head_dim) == (
      (2, 2), 80, (2, 2), 80)
  assert (cfg.activation, cfg.text.eot_token_id) == ("quick_gelu", 99)
  got_i, got_t = flax_features(params, cfg, img, tok)
  assert np.abs(got_i - want_i).max() < TOL and np.abs(got_t - want_t).max() < TOL


FLAGS80 = ["--vision-head-dim=80", "--text-head-dim=80"]
TINYCLIP_WRAP = lambda sd: {("_image_encoder.module." if k.startswith("visual.") else  # noqa: E731
                             "_logit_scale.module." if k == "logit_scale" else
                             "_text_encoder.module.") + k: v for k, v in sd.items()}


@pytest.mark.parametrize("kind, flags", [("hf", []), ("openai", FLAGS80),
                                         ("open_clip", FLAGS80 + ["--activation=quick_gelu"]),
                                         ("tinyclip", FLAGS80 + ["--activation=quick_gelu"]),
                                         ("open_clip", "hub config")])
def test_80_channel_heads_import_from_every_source_kind(heads80, tmp_path, kind, flags):
  d, sd, *_ = heads80
  src = d / "hf"
  if kind != "hf":
    src = tmp_path / "weights.safetensors"
    write_safetensors_atomic(src, TINYCLIP_WRAP(sd) if kind == "tinyclip" else sd)
  if flags == "hub config":  # as open_clip writes it for hub models
    flags = []
    vision = dict(image_size=32, layers=2, width=160, head_width=80, patch_size=16, mlp_ratio=0.4)
    text = dict(context_length=8, vocab_size=100, width=160, heads=2, layers=2, mlp_ratio=0.4,
                pool_type="eos", eos_id=99)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(
        embed_dim=24, quick_gelu=True, vision_cfg=vision, text_cfg=text)}))
  assert main([f"--src={kind}:{src}", f"--dst=flax:{tmp_path / 'out'}"] + flags) == 0
  _check_heads80(tmp_path / "out", heads80)


@pytest.mark.parametrize("kind", ["openai", "open_clip", "tinyclip"])
def test_head_size_that_nothing_records_is_refused_naming_the_flag(heads80, tmp_path, capsys,
                                                                   kind):
  write_safetensors_atomic(tmp_path / "w.safetensors", heads80[1])
  assert main([f"--src={kind}:{tmp_path / 'w.safetensors'}", f"--dst=flax:{tmp_path / 'o'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "[160] channels wide, not a multiple of 64" in err
  assert "--vision-head-dim=N" in err and not (tmp_path / "o").exists()


def test_known_widths_with_other_head_sizes_are_not_assumed():
  with pytest.raises(CheckpointError, match=r"1280 wide like open_clip's ViT-H-14, whose heads "
                     r"have 80 channels.*--model=ViT-H-14 or --vision-head-dim=80"):
    meta.head_dim("vision", [1280] * 32, None, vit_width=1280)
  assert meta.head_dim("text", [1280] * 32, None) == 64  # bigG's text tower: 20 heads of 64
  assert meta.head_dim("vision", [1280], 80, vit_width=1280) == 80
  facts = meta.named_facts("ViT-H-14-quickgelu")
  assert (facts.activation, facts.vision_head_dim, facts.text_head_dim) == ("quick_gelu", 80, 64)
  assert meta.named_facts("ViT-H-14").activation is None  # a plain name states no activation
  meta.check_named("ViT-B-32-quickgelu", zoo.get("ViT-B-32", activation="quick_gelu"))
  with pytest.raises(ValueError, match="--model=ViT-B-32 has vision width 768 but the "
                     "checkpoint has 64; it is another model"):
    meta.check_named("ViT-B-32", UNIFORM.replace(embed_dim=512))
  with pytest.raises(ValueError, match="--model=ViT-X is not a known model; use one of .*ViT-H-14"):
    meta.named_facts("ViT-X")


def test_assumptions_are_logged_naming_the_flags(tmp_path, caplog):
  model_io.save_model(tmp_path / "src", random_params(UNIFORM), UNIFORM)
  assert main([f"--src=flax:{tmp_path / 'src'}", f"--dst=open_clip:{tmp_path / 'm.pt'}"]) == 0
  os.remove(tmp_path / "open_clip_config.json")  # a bare state dict, as most are shared
  with caplog.at_level(logging.WARNING):
    assert main([f"--src=open_clip:{tmp_path / 'm.pt'}", f"--dst=flax:{tmp_path / 'a'}",
                 "--text-head-dim=16"]) == 0
  said = " ".join(_assumptions(caplog))
  assert "assumed gelu" in said and "--activation=quick_gelu" in said
  assert "assumed 64 channels ([1] heads)" in said and "--vision-head-dim=N" in said
  assert "assumed CLIP's 49407" in said and "--eot-token-id=N" in said
  assert model_io.load_config(tmp_path / "a") == UNIFORM.replace(
      activation="gelu", vision=vision_tower(64, 2, 8, image_size=32, mlp=96))
  assert main([f"--src=open_clip:{tmp_path / 'm.pt'}", f"--dst=flax:{tmp_path / 'b'}",
               "--activation=quick_gelu", "--vision-head-dim=32", "--text-head-dim=16",
               "--eot-token-id=49407"]) == 0
  assert model_io.load_config(tmp_path / "b") == UNIFORM


def test_contradictions_and_foreign_configs_are_refused(tmp_path, capsys):
  model_io.save_model(tmp_path / "src", random_params(UNIFORM), UNIFORM)
  assert main([f"--src=flax:{tmp_path / 'src'}", f"--dst=open_clip:{tmp_path / 'm.pt'}"]) == 0
  capsys.readouterr()
  cases = [(["--activation=gelu"], "the command line says activation = gelu but", "quick_gelu"),
           (["--model=ViT-B-32"], "--model=ViT-B-32 says vision_head_dim = 64 but", "says 32")]
  for flags, words, said in cases:
    argv = [f"--src=open_clip:{tmp_path / 'm.pt'}", f"--dst=flax:{tmp_path / 'o'}"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "open_clip_config.json" in err, err
    assert f"{said}; drop or fix one of them" in err
  doc = json.loads((tmp_path / "open_clip_config.json").read_text())
  doc["model_cfg"]["text_cfg"]["layers"] = 3  # the config of another model beside the file
  (tmp_path / "other.json").write_text(json.dumps(doc))
  assert main([f"--src=open_clip:{tmp_path / 'm.pt'}", f"--dst=flax:{tmp_path / 'o'}",
               f"--open-clip-config={tmp_path / 'other.json'}"]) == 2
  assert "gives text_cfg.layers 3 but the weights have 2" in capsys.readouterr().err
  doc["model_cfg"]["text_cfg"].update(layers=2, no_causal_mask=True)
  (tmp_path / "other.json").write_text(json.dumps(doc))
  assert main([f"--src=open_clip:{tmp_path / 'm.pt'}", f"--dst=flax:{tmp_path / 'o'}",
               f"--open-clip-config={tmp_path / 'other.json'}"]) == 2
  assert "text_cfg.no_causal_mask = True, which this model does not implement" in (
      capsys.readouterr().err)
  assert main([f"--src=open_clip:{tmp_path / 'm.pt'}", f"--dst=flax:{tmp_path / 'o'}",
               "--open-clip-config=/absent.json"]) == 2
  assert "/absent.json is not readable JSON" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_a_padded_export_that_was_changed_stays_padded(caplog):
  params = random_params(PRUNED)
  sd, hf_cfg = to_hf(params, PRUNED)
  key = "vision_model.encoder.layers.1.self_attn.out_proj.weight"  # a padded (zero) layer
  assert not sd[key].any()
  sd[key] = sd[key] + np.float32(1e-3)
  with caplog.at_level(logging.WARNING):
    back, cfg = from_hf(sd, hf_cfg)
  assert cfg == pad.padded_config(PRUNED, "hf") and cfg.vision.heads == (2, 2, 2)
  assert "zero padding of these weights is not zero any more" in caplog.text


# ----------------------------------------------------------------------------- kind 6: pooling


def test_hf_export_pools_at_the_tokenizers_end_of_text_with_an_added_token(tmp_path):
  params = random_params(UNIFORM, 5)
  model_io.save_model(tmp_path / "src", params, UNIFORM)
  assert main([f"--src=flax:{tmp_path / 'src'}", f"--dst=hf:{tmp_path / 'hf'}"]) == 0
  text_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
  assert (text_cfg["vocab_size"], text_cfg["eos_token_id"], text_cfg["bos_token_id"]) == (
      ADDED + 1, 49407, 49406)
  tok = np.zeros((3, 12), np.int32)
  tok[0, :5] = [49406, 320, ADDED, 1125, 49407]  # OpenAI's largest-id rule: position 2
  tok[1, :4] = [49406, ADDED, 49407, ADDED]
  tok[2, :3] = [49406, 320, 49407]
  assert (tok.argmax(-1) != (tok == 49407).argmax(-1))[:2].all()  # the rules disagree here
  model = CLIPModel.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    want = model.get_text_features(input_ids=torch.from_numpy(tok).long())
  want = (want.pooler_output if hasattr(want, "pooler_output") else want).numpy()
  img = np.zeros((1, 32, 32, 3), np.float32)
  assert np.abs(flax_features(params, UNIFORM, img, tok)[1] - want).max() < TOL


def test_the_end_of_text_id_is_read_and_checked():
  assert CLIPConfig.from_dict({**UNIFORM.to_dict(), "text": {
      k: v for k, v in UNIFORM.to_dict()["text"].items() if k != "eot_token_id"}}) == UNIFORM
  assert text_tower(64, 1, vocab_size=49408).eot_token_id == 49407
  assert text_tower(64, 1, vocab_size=60).eot_token_id == 59  # a toy vocabulary's last id
  with pytest.raises(ConfigError, match="eot_token_id 60 is outside the vocabulary of 60 ids"):
    text_tower(64, 1, vocab_size=60, eot_token_id=60)
  sd, hf_cfg = to_hf(random_params(PRUNED), PRUNED)
  legacy = {**hf_cfg, "text_config": {**hf_cfg["text_config"], "eos_token_id": 2}}
  del legacy[meta.RECORD]  # an old config.json: transformers pools at the largest id, 59
  assert from_hf(sd, legacy)[1].text.eot_token_id == 59
  eot2 = UNIFORM.replace(text=text_tower(48, 1, heads=3, head_dim=16, context_length=12,
                                         vocab_size=60, eot_token_id=2))
  with pytest.raises(CheckpointError, match="legacy setting"):
    to_hf(random_params(eot2), eot2)
  assert sidecar.model_cfg(RESNET)["text_cfg"].get("pool_type", "argmax") == "argmax"  # 59 = last
