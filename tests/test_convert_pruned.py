"""Pruned (per-layer heterogeneous) models across formats: zero-padded export to HF's
CLIPModel and open_clip against transformers and the PyTorch reference, TinyCLIP's
pruned layout (gaps, missing sub-layers, pruned hidden width) against a PyTorch
model of exactly that shape, bit-exact round trips, and the refusals."""
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig as HFConfig  # noqa: E402
from transformers import CLIPModel  # noqa: E402

from test_convert_maps import assert_close, flax_embed, hf_embed, inputs  # noqa: E402
from test_convert_maps import random_params, randomize_, ref_embed  # noqa: E402
from torch_reference import CLIP as TorchCLIP  # noqa: E402
from torch_reference import pruned_clip  # noqa: E402
from tinyclip_jax.convert import CheckpointError, flatten, from_openai  # noqa: E402
from tinyclip_jax.convert import to_hf, to_open_clip  # noqa: E402
from tinyclip_jax.convert.__main__ import main  # noqa: E402
from tinyclip_jax.convert.io import read_state_dict, write_safetensors_atomic  # noqa: E402
from tinyclip_jax.convert.io import write_torch_atomic  # noqa: E402
from tinyclip_jax.convert.pad import pad_uniform  # noqa: E402
from tinyclip_jax.convert.tinyclip import from_tinyclip, to_tinyclip  # noqa: E402
from tinyclip_jax.models import CLIPConfig, text_tower, vision_tower  # noqa: E402

# Pads to 2 heads / MLP 512 (vision) and 1 head / MLP 128 (text); every kind of hole:
# pruned heads, MLP units, whole attention and whole MLP sub-layers.
PADDABLE = CLIPConfig(
    24,
    vision_tower(128, 4, 8, image_size=32, heads=(2, 0, 1, 2), mlp=(300, 512, 0, 64)),
    text_tower(64, 3, heads=(1, 1, 0), mlp=(0, 128, 96), context_length=12, vocab_size=50),
    activation="quick_gelu")
# Pruned hidden widths (96 and 80: not multiples of 64) and a vision block pruned
# away entirely (block 1), as in TinyCLIP's auto checkpoints.
NARROW = CLIPConfig(
    24,
    vision_tower(96, 4, 8, image_size=32, heads=(1, 0, 2, 0), mlp=(200, 0, 0, 40)),
    text_tower(80, 2, heads=(1, 0), mlp=(100, 30), context_length=12, vocab_size=50),
    activation="gelu")
NARROW_FLAX = NARROW.replace(
    vision=vision_tower(96, 3, 8, image_size=32, heads=(1, 2, 0), mlp=(200, 0, 40)))
IMAGE, TEXT = "image_encoder_without_ddp.", "text_encoder_without_ddp."


def torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  model = randomize_(pruned_clip(cfg), seed)
  with torch.no_grad():  # the reference inits biases to 0: randomize them all
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


def numpy_sd(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def tinyclip_keys(sd):
  """OpenAI keys → TinyCLIP's released layout."""

  def wrap(k):
    if k == "logit_scale":
      return "_logit_scale.logit_scale"
    return (IMAGE if k.startswith("visual.") else TEXT) + k

  return {wrap(k): v for k, v in sd.items()}


def renumber(key):
  """Vision block numbers of NARROW (1 pruned away) → those of NARROW_FLAX."""
  pre = IMAGE + "visual.transformer.resblocks."
  if key.startswith(pre):
    i, rest = key[len(pre):].split(".", 1)
    return f"{pre}{ {0: 0, 2: 1, 3: 2}[int(i)] }.{rest}"
  return key


def assert_sd_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype == np.float32, k
    assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def narrow():
  model = torch_model(NARROW).eval()
  return model, tinyclip_keys(numpy_sd(model))


# ----------------------------------------------------------------------------- padding


def test_hf_export_pads_exactly_and_matches_transformers(caplog):
  params = random_params(PADDABLE, 3)
  with caplog.at_level(logging.INFO):
    sd, hf_cfg = to_hf(params, PADDABLE)
  note = "\n".join(r.getMessage() for r in caplog.records)
  assert "vision heads [2, 0, 1, 2] -> 2, MLP [300, 512, 0, 64] -> 512" in note
  assert "text heads [1, 1, 0] -> 1, MLP [0, 128, 96] -> 128" in note
  v, t = hf_cfg["vision_config"], hf_cfg["text_config"]
  assert (v["num_attention_heads"], v["intermediate_size"], v["num_hidden_layers"]) == (2, 512, 4)
  assert (t["num_attention_heads"], t["intermediate_size"], t["num_hidden_layers"]) == (1, 128, 3)
  model = CLIPModel(HFConfig(**hf_cfg)).eval()
  result = model.load_state_dict({k: torch.from_numpy(x) for k, x in sd.items()}, strict=False)
  assert not result.missing_keys and not result.unexpected_keys
  img, tok = inputs(PADDABLE)
  err = assert_close(flax_embed(params, PADDABLE, img, tok), hf_embed(model, img, tok))
  print(f"padded HF export vs transformers: max abs diff {err:.2e}")


def test_open_clip_export_pads_exactly_and_matches_reference():
  params = random_params(PADDABLE, 4)
  sd = to_open_clip(params, PADDABLE)
  padded = from_openai(sd, PADDABLE.activation)[1]
  assert padded.vision.heads == (2,) * 4 and padded.text.mlp == (128,) * 3
  ref = TorchCLIP.from_config(padded).eval()  # nn.MultiheadAttention blocks, uniform
  ref.load_state_dict({k: torch.from_numpy(x) for k, x in sd.items()}, strict=True)
  img, tok = inputs(PADDABLE)
  assert_close(flax_embed(params, PADDABLE, img, tok), ref_embed(ref, img, tok))
  # The pad itself: kept weights in place, zeros elsewhere, a pruned ln_1 is 1/0.
  blk = "visual.transformer.resblocks."
  w = sd[blk + "2.attn.in_proj_weight"].reshape(3, 2, 64, 128)
  assert not w[:, 1].any() and w[:, 0].any()
  assert np.array_equal(sd[blk + "1.ln_1.weight"], np.ones(128, np.float32))
  assert not sd[blk + "1.attn.out_proj.bias"].any() and not sd[blk + "2.mlp.c_fc.bias"].any()
  assert not sd[blk + "3.mlp.c_proj.weight"][:, 64:].any()


def test_uniform_model_is_not_padded(caplog):
  cfg = PADDABLE.replace(
      vision=vision_tower(128, 2, 8, image_size=32, mlp=96),
      text=text_tower(64, 1, mlp=80, context_length=12, vocab_size=50))
  params = random_params(cfg)
  with caplog.at_level(logging.INFO):
    out, same = pad_uniform(params, cfg, "HF")
  assert same is cfg and out["visual"] is params["visual"]
  assert not any("padded" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("tower, pattern", [
    (vision_tower(96, 2, 8, image_size=32, heads=(1, 1),
                  mlp=(40, 40)), "pruned vision tower has width 96 and per-layer heads \\[1, 1\\]"),
    (vision_tower(128, 2, 8, image_size=32, heads=(3, 1), mlp=(40, 40)),
     "pruned vision tower has width 128 and per-layer heads \\[3, 1\\]"),
])
def test_padding_refuses_what_is_not_exact(tower, pattern):
  cfg = PADDABLE.replace(vision=tower)
  for export in (to_hf, to_open_clip):
    with pytest.raises(CheckpointError, match=pattern + ".*--dst=tinyclip:PATH"):
      export(random_params(cfg), cfg)


# ----------------------------------------------------------------------------- TinyCLIP layout


def test_tinyclip_import_matches_torch_reference(narrow):
  model, sd = narrow
  assert not any(k.startswith(IMAGE + "visual.transformer.resblocks.1.") for k in sd)
  params, cfg = from_openai(sd, "gelu")  # detected by its keys
  assert cfg == NARROW_FLAX
  assert "attn" not in params["visual"]["layers_2"] and "mlp" not in params["visual"]["layers_1"]
  img, tok = inputs(NARROW)
  err = assert_close(flax_embed(params, cfg, img, tok), ref_embed(model, img, tok))
  print(f"TinyCLIP pruned import vs torch reference: max abs diff {err:.2e}")


def test_tinyclip_wrappers_are_accepted(narrow):
  _, sd = narrow
  ddp = {
      ("_image_encoder.module." + k[len(IMAGE):] if k.startswith(IMAGE) else "module." +
       k.replace(TEXT, "_text_encoder.")):
          v for k, v in sd.items()
  }
  assert any(k.startswith("module._logit_scale.") for k in ddp)
  params, cfg = from_tinyclip({"state_dict": ddp}, "gelu")
  want = from_tinyclip(sd, "gelu")[0]
  assert cfg == NARROW_FLAX
  assert all(np.array_equal(a, b) for a, b in zip(flatten(params).values(), flatten(want).values()))


def test_tinyclip_export_matches_torch_reference_and_round_trips(narrow):
  model, sd = narrow
  params, cfg = from_tinyclip(sd, "gelu")
  out = to_tinyclip(params, cfg)
  # Bit-exact, keys included, once the pruned-away block is closed up.
  assert_sd_equal(out, {renumber(k): v for k, v in sd.items()})
  assert_sd_equal(to_tinyclip(*from_tinyclip(out, "gelu")), out)
  # What TinyCLIP's own pruned modules load: a PyTorch model of that shape.
  ref = pruned_clip(cfg).eval()
  strip = lambda k: k.split(".", 1)[1] if k.startswith(("_logit", IMAGE, TEXT)) else k
  ref.load_state_dict({strip(k): torch.from_numpy(v) for k, v in out.items()}, strict=True)
  img, tok = inputs(cfg)
  assert_close(ref_embed(ref, img, tok), ref_embed(model, img, tok))


def test_masked_checkpoint_is_refused(narrow):
  _, sd = narrow
  masked = {
      **sd, IMAGE + "l0_module.hidden_loga": np.zeros(96, np.float32),
      TEXT + "l0_module.hidden_loga": np.zeros(80, np.float32)
  }
  with pytest.raises(CheckpointError, match="L0 mask tensors .* need the prune step"):
    from_openai(masked, "gelu")


# ----------------------------------------------------------------------------- CLI


def _one_error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_cli_tinyclip_round_trip_through_flax_is_bit_exact(narrow, tmp_path):
  _, sd = narrow
  src = tmp_path / "TinyCLIP-auto.pt"
  write_torch_atomic(src, sd, wrap="state_dict")  # as released: {'state_dict': ...}
  assert main([f"--src=tinyclip:{src}", f"--dst=flax:{tmp_path / 'flax'}"]) == 0
  dst = tmp_path / "back.pt"
  assert main([f"--src=flax:{tmp_path / 'flax'}", f"--dst=tinyclip:{dst}"]) == 0
  raw = torch.load(dst, weights_only=True)
  assert set(raw) == {"state_dict"}
  assert_sd_equal(read_state_dict(dst), {renumber(k): v for k, v in sd.items()})


def test_cli_hf_export_of_a_pruned_model_says_it_padded(tmp_path, capsys):
  params = random_params(PADDABLE, 5)
  src = tmp_path / "pruned.safetensors"
  write_safetensors_atomic(src, to_tinyclip(params, PADDABLE))
  dst = tmp_path / "hf"
  assert main([f"--src=tinyclip:{src}", "--activation=quick_gelu", f"--dst=hf:{dst}"]) == 0
  err = capsys.readouterr().err
  assert "padded the pruned model with zero weights" in err and "vision heads [2, 0, 1, 2]" in err
  model = CLIPModel.from_pretrained(dst).eval()
  img, tok = inputs(PADDABLE)
  assert_close(flax_embed(params, PADDABLE, img, tok), hf_embed(model, img, tok))


@pytest.mark.parametrize("dst", ["hf:out", "open_clip:out.safetensors"])
def test_cli_refuses_unpaddable_width_and_writes_nothing(narrow, tmp_path, capsys, dst):
  _, sd = narrow
  src = tmp_path / "narrow.pt"
  write_torch_atomic(src, sd)
  kind, name = dst.split(":")
  assert main([f"--src=tinyclip:{src}", f"--dst={kind}:{tmp_path / name}"]) == 2
  err = _one_error(capsys)
  assert "pruned vision tower has width 96" in err and "--dst=tinyclip:PATH" in err
  assert sorted(os.listdir(tmp_path)) == ["narrow.pt"]


def test_cli_refuses_masks_of_another_model(narrow, tmp_path, capsys):
  _, sd = narrow
  src = tmp_path / "masked.pt"
  write_torch_atomic(
      src, {
          **sd, "_image_encoder.module.l0_module.heads_loga": np.zeros((4, 12), np.float32)
      },
      wrap="state_dict")
  assert main([f"--src=tinyclip:{src}", f"--dst=flax:{tmp_path / 'out'}"]) == 2
  assert "masks belong to another model" in _one_error(capsys)
  assert not (tmp_path / "out").exists()


def test_cli_prunes_a_masked_checkpoint_with_its_masks(narrow, tmp_path):
  """The CLI reads a masked TinyCLIP checkpoint as weights + mask log α and prunes it:
  a head at log α -60 is closed and cut; heads at +60 keep gate 1 exactly, so every
  other weight is the unmasked model's, bit for bit (the cut is done here by hand)."""
  from tinyclip_jax.model_io import load_model  # pylint: disable=import-outside-toplevel
  _, sd = narrow
  loga = np.full((3, 2), 60.0, np.float32)  # NARROW_FLAX vision heads (1, 2, 0)
  loga[1, 0] = -60.0
  src = tmp_path / "masked.pt"
  write_torch_atomic(src, {**sd, "_image_encoder.module.l0_module.heads_loga": loga,
                           "_image_encoder.module.l0_module.lambda_1": np.float32(1.0)},
                     wrap="state_dict")
  assert main([f"--src=tinyclip:{src}", f"--dst=flax:{tmp_path / 'out'}"]) == 0
  got, cfg = load_model(tmp_path / "out")
  assert cfg.vision.heads == (1, 1, 0) and cfg.text == NARROW_FLAX.text
  want = flatten(from_tinyclip(sd, "gelu")[0])
  attn = "visual/layers_1/attn/"
  want[attn + "in_proj_kernel"] = want[attn + "in_proj_kernel"][:, :, 1:]  # (W, 3, H, d)
  want[attn + "in_proj_bias"] = want[attn + "in_proj_bias"][:, 1:]  # (3, H, d)
  want[attn + "out_proj_kernel"] = want[attn + "out_proj_kernel"][1:]  # (H, d, W)
  got = flatten(got)
  assert got.keys() == want.keys()
  for k in want:
    assert np.array_equal(got[k], want[k]), k
