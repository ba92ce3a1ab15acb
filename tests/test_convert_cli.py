"""`python -m tinyclip_jax.convert` end to end, in-process through main(argv): every
source kind, every destination kind, exports that transformers and the PyTorch
reference load, bit-exact round trips through files, and bad input (exit code 2,
one sentence, nothing at the destination)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from torch_reference import CLIP as TorchCLIP  # noqa: E402
from tinyclip_jax import model_io, tokenizer  # noqa: E402
from tinyclip_jax.convert import flatten, from_openai  # noqa: E402
from tinyclip_jax.convert.__main__ import main  # noqa: E402
from tinyclip_jax.eval import encode  # noqa: E402
from tinyclip_jax.convert.io import read_state_dict, write_safetensors_atomic  # noqa: E402
from tinyclip_jax.models import CLIPConfig, text_tower, vision_tower  # noqa: E402
from tinyclip_jax.preprocess import normalize  # noqa: E402

# The real vocabulary and context, so the exported tokenizer and HF pipeline apply.
CFG = CLIPConfig(32, vision_tower(64, 2, 8, image_size=32, mlp=96), text_tower(64, 2, mlp=80),
                 activation="quick_gelu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomized_model(cfg, seed=0):
  torch.manual_seed(seed)
  model = TorchCLIP.from_config(cfg).eval()
  with torch.no_grad():  # LayerNorm 1/0 inits would hide mix-ups
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def numpy_state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def assert_trees_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    assert np.asarray(fa[key]).dtype == np.asarray(fb[key]).dtype, key
    assert np.array_equal(np.asarray(fa[key]), np.asarray(fb[key])), key


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  d = tmp_path_factory.mktemp("convert_cli")
  model = randomized_model(CFG)
  tokens = torch.zeros(1, 77, dtype=torch.long)
  tokens[0, :3] = torch.tensor([49406, 320, 49407])
  with torch.no_grad():
    torch.jit.save(torch.jit.trace(model, (torch.randn(1, 3, 32, 32), tokens)),
                   str(d / "openai_ts.pt"))
  torch.save(model.state_dict(), d / "openai_sd.pt")
  assert main([f"--src=openai:{d / 'openai_sd.pt'}", f"--dst=flax:{d / 'flax'}"]) == 0
  sd = numpy_state_dict(model)
  return types.SimpleNamespace(dir=d, model=model, sd=sd, flax=d / "flax",
                               params=from_openai(sd, "quick_gelu")[0])


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("name", ["openai_ts.pt", "openai_sd.pt"])
def test_openai_to_flax(work, tmp_path, name):
  assert main([f"--src=openai:{work.dir / name}", f"--dst=flax:{tmp_path / 'out'}"]) == 0
  params, cfg = model_io.load_model(tmp_path / "out")
  assert cfg == CFG  # quick_gelu is the openai default
  assert_trees_equal(params, work.params)
  assert model_io.load_extra(tmp_path / "out")["converted_from"].startswith("openai:")


def tinyclip_layout(sd):
  """TinyCLIP's released layout: DDP-wrapped towers under a 'state_dict' key, fp16."""
  def key(k):
    if k.startswith("visual."):
      return "_image_encoder.module." + k
    return "_logit_scale.module." + k if k == "logit_scale" else "_text_encoder.module." + k
  return {"state_dict": {key(k): torch.from_numpy(v).half() for k, v in sd.items()}}


def test_open_clip_tinyclip_fp16_to_flax(work, tmp_path, capsys):
  torch.save(tinyclip_layout(work.sd), tmp_path / "tinyclip.pt")
  assert main([f"--src=open_clip:{tmp_path / 'tinyclip.pt'}", f"--dst=flax:{tmp_path / 'a'}"]) == 0
  params, cfg = model_io.load_model(tmp_path / "a")
  assert cfg == CFG.replace(activation="gelu")  # the open_clip default
  rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in work.sd.items()}
  assert_trees_equal(params, from_openai(rounded, "gelu")[0])
  log = capsys.readouterr().out
  assert "reading open_clip checkpoint" in log and "activation gelu" in log and "wrote flax" in log
  assert main([f"--src=open_clip:{tmp_path / 'tinyclip.pt'}", f"--dst=flax:{tmp_path / 'b'}",
               "--activation=quick_gelu"]) == 0
  assert model_io.load_model(tmp_path / "b")[1] == CFG


# ----------------------------------------------------------------------------- destinations


def test_flax_open_clip_flax_is_bit_exact_and_loads_strictly(work, tmp_path):
  for name in ("oc.safetensors", "oc.pt"):
    assert main([f"--src=flax:{work.flax}", f"--dst=open_clip:{tmp_path / name}"]) == 0
    sd = read_state_dict(tmp_path / name)
    reference = TorchCLIP.from_config(CFG)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert all(np.array_equal(sd[k], v) for k, v in work.sd.items())
  assert main([f"--src=open_clip:{tmp_path / 'oc.safetensors'}", f"--dst=flax:{tmp_path / 'back'}",
               "--activation=quick_gelu"]) == 0
  params, cfg = model_io.load_model(tmp_path / "back")
  assert cfg == CFG
  assert_trees_equal(params, work.params)


def _features(x):  # transformers 5 may return a model output instead of a tensor
  return (x.pooler_output if hasattr(x, "pooler_output") else x).detach().numpy()


def test_flax_hf_flax_and_transformers_loads_it(work, tmp_path):
  from transformers import CLIPModel, pipeline
  hf_dir = tmp_path / "hf"
  assert main([f"--src=flax:{work.flax}", f"--dst=hf:{hf_dir}"]) == 0
  assert main([f"--src=hf:{hf_dir}", f"--dst=flax:{tmp_path / 'back'}"]) == 0
  params, cfg = model_io.load_model(tmp_path / "back")
  assert cfg == CFG
  assert_trees_equal(params, work.params)

  pixels = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  labels = ["a diagram", "a dog", "a cat"]
  texts = [f"This is a photo of {label}." for label in labels]  # the pipeline's template
  image_fn, text_fn = encode.encoders(CFG, work.params)
  img = np.asarray(image_fn(normalize(pixels)))
  txt = np.asarray(text_fn(tokenizer.tokenize(texts, 77)))

  hf = CLIPModel.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    hf_img = _features(hf.get_image_features(
        pixel_values=torch.from_numpy(normalize(pixels).transpose(0, 3, 1, 2))))
    hf_tok = tokenizer.tokenize(texts, 77)
    hf_txt = _features(hf.get_text_features(input_ids=torch.from_numpy(hf_tok).long()))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  assert np.abs(unit(hf_img) - img).max() < 1e-5
  assert np.abs(unit(hf_txt) - txt).max() < 1e-5

  classify = pipeline("zero-shot-image-classification", model=str(hf_dir))
  logits = np.exp(np.float32(work.params["logit_scale"])) * img @ txt.T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for row, image in zip(probs, pixels):
    result = classify(Image.fromarray(image), candidate_labels=labels)
    got = {r["label"]: r["score"] for r in result}
    assert np.abs(np.array([got[label] for label in labels]) - row).max() < 1e-5


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(d, flax_dir):
  (d / "not_a_checkpoint").mkdir(exist_ok=True)
  (d / "not_a_checkpoint" / "notes.txt").write_text("hello")
  write_safetensors_atomic(d / "trunc.safetensors", {"w": np.ones((16, 16), np.float32)})
  (d / "trunc.safetensors").write_bytes((d / "trunc.safetensors").read_bytes()[:-100])
  torch.save(torch.nn.Linear(3, 3).state_dict(), d / "linear.pt")
  (d / "plain.pt").write_bytes(pickle.dumps({"w": [1, 2]}))
  return {
      "missing file": ([f"--src=openai:{d / 'absent.pt'}"], "does not exist"),
      "folder that is not a flax checkpoint": ([f"--src=flax:{d / 'not_a_checkpoint'}"],
                                               "not a model checkpoint"),
      "folder that is not an hf model": ([f"--src=hf:{d / 'not_a_checkpoint'}"],
                                         "no config.json"),
      "directory as a file": ([f"--src=openai:{d / 'not_a_checkpoint'}"], "is a directory"),
      "truncated safetensors": ([f"--src=open_clip:{d / 'trunc.safetensors'}"], "truncated"),
      "another architecture": ([f"--src=open_clip:{d / 'linear.pt'}"],
                               "not an OpenAI/open_clip CLIP ViT"),
      "plain pickle": ([f"--src=openai:{d / 'plain.pt'}"], "plain pickle"),
      "unknown kind": ([f"--src=caffe:{d / 'x'}"], "kind 'caffe' is unknown"),
      "malformed location": (["--src=openai"], "is not KIND:PATH"),
      "missing --src": ([], "required"),
      "activation for hf": ([f"--src=flax:{flax_dir}", "--activation=gelu"],
                            "--activation applies to openai, open_clip and tinyclip"),
      "bad activation": ([f"--src=openai:{d / 'absent.pt'}", "--activation=relu"],
                         "invalid choice"),
  }


CASES = ["missing file", "folder that is not a flax checkpoint", "folder that is not an hf model",
         "directory as a file", "truncated safetensors", "another architecture", "plain pickle",
         "unknown kind", "malformed location", "missing --src", "activation for hf",
         "bad activation"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dst_kind", ["flax", "hf"])
def test_bad_input_exits_2_with_one_sentence(work, tmp_path, capsys, case, dst_kind):
  argv, words = _bad_inputs(tmp_path, work.flax)[case]
  dst = tmp_path / "dst"
  assert main(argv + [f"--dst={dst_kind}:{dst}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
  assert not dst.exists()


def test_bad_destinations(work, tmp_path, capsys):
  src = f"--src=flax:{work.flax}"
  assert main([src, f"--dst=open_clip:{tmp_path / 'x.npz'}"]) == 2
  assert "must end in" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  assert main([src, f"--dst=hf:{tmp_path / 'taken'}"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]
  assert main([src, f"--dst=flax:{tmp_path / 'taken'}", "--overwrite"]) == 0
  assert model_io.load_model(tmp_path / "taken")[1] == CFG


def test_failure_while_writing_leaves_no_destination(work, tmp_path, capsys, monkeypatch):
  def broken(*args, **kwargs):
    raise OSError(28, "No space left on device", "tokenizer.json")
  monkeypatch.setattr(tokenizer, "write_hf_files", broken)
  assert main([f"--src=flax:{work.flax}", f"--dst=hf:{tmp_path / 'hf'}"]) == 2
  assert "No space left on device" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []  # neither the folder nor its staging copy


def test_pruned_model_is_padded_for_hf(work, tmp_path, capsys):
  # Parity of padded exports and the refusals: tests/test_convert_pruned.py.
  pruned = CFG.replace(text=dataclasses.replace(CFG.text, heads=(1, 0)))
  params = jax.tree.map(np.copy, work.params)
  del params["text"]["layers_1"]["attn"], params["text"]["layers_1"]["ln_1"]
  model_io.save_model(tmp_path / "pruned", params, pruned)
  assert main([f"--src=flax:{tmp_path / 'pruned'}", f"--dst=hf:{tmp_path / 'hf'}"]) == 0
  assert "text heads [1, 0] -> 1" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["hf", "pruned"]


def test_command_line_exit_codes(work, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "tinyclip_jax.convert"]
  bad = subprocess.run(cmd + [f"--src=openai:{tmp_path / 'absent.pt'}",
                              f"--dst=flax:{tmp_path / 'out'}"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
  good = subprocess.run(cmd + [f"--src=flax:{work.flax}",
                               f"--dst=open_clip:{tmp_path / 'm.safetensors'}"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert good.returncode == 0, good.stderr
  assert "wrote open_clip checkpoint" in good.stdout
  assert set(read_state_dict(tmp_path / "m.safetensors")) == set(work.sd)
