"""Tensor-file I/O: TorchScript archives read without running code, torch.save and
safetensors files, Hugging Face folders, refusals with one-sentence reasons, and
atomic writes."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from torch_reference import CLIP as TorchCLIP
from tinyclip_jax.convert.common import CheckpointError
from tinyclip_jax.convert.io import (read_hf_folder, read_state_dict, read_torchscript,
                                     write_safetensors_atomic, write_torch_atomic)
from tinyclip_jax.models import CLIPConfig, text_tower, vision_tower


def tiny_config(activation="quick_gelu", vocab=100, context=12):
  return CLIPConfig(32, vision_tower(64, 2, 8, image_size=16, mlp=96),
                    text_tower(64, 1, mlp=80, context_length=context, vocab_size=vocab),
                    activation=activation)


def torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  return TorchCLIP.from_config(cfg).eval()


def example_inputs(cfg):
  s, n = cfg.vision.image_size, cfg.text.context_length
  tokens = torch.zeros(2, n, dtype=torch.long)
  tokens[:, :3] = torch.tensor([1, 5, cfg.text.vocab_size - 1])
  return torch.randn(2, 3, s, s), tokens


def numpy_state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def model():
  return torch_model(tiny_config())


@pytest.fixture(scope="module")
def traced_archive(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("ts") / "traced.pt"
  with torch.no_grad():
    torch.jit.save(torch.jit.trace(model, example_inputs(tiny_config())), str(path))
  return path


def assert_matches_state_dict(got, module):
  want = numpy_state_dict(module)
  # Archives also hold non-persistent buffers (the causal mask), which state_dict() omits.
  assert set(want) <= set(got) and set(got) - set(want) <= {"attn_mask"}
  for key, value in want.items():
    assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


# ----------------------------------------------------------------------------- TorchScript


def test_traced_archive_tensors_equal_state_dict(model, traced_archive):
  assert_matches_state_dict(read_state_dict(traced_archive), model)


def test_scripted_archive_tensors_equal_state_dict(model, tmp_path):
  path = tmp_path / "scripted.pt"
  torch.jit.save(torch.jit.script(model), str(path))
  assert_matches_state_dict(read_state_dict(path), model)


def test_archive_views_and_half_storages(tmp_path):
  """Tensors that are strided views into a shared storage, and fp16/bf16 storages."""
  class Views(torch.nn.Module):
    def __init__(self):
      super().__init__()
      base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
      self.register_buffer("base", base)
      self.register_buffer("column", base[:, 1])  # offset 1, stride 4 into base's storage
      self.register_buffer("h16", torch.randn(5).half())
      self.register_buffer("b16", torch.randn(5).bfloat16())

    def forward(self, x):
      return x + self.base.sum()

  module = Views()
  path = tmp_path / "views.pt"
  torch.jit.save(torch.jit.script(module), str(path))
  got = read_state_dict(path)
  assert np.array_equal(got["column"], [1.0, 5.0, 9.0])
  assert got["h16"].dtype == got["b16"].dtype == np.float32
  assert np.array_equal(got["h16"], module.h16.float().numpy())
  assert np.array_equal(got["b16"], module.b16.float().numpy())


class _WritesMarker:
  """Unpickling this object runs a shell command that creates a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _archive_with_pkl(source, dest, pkl: bytes):
  """A copy of the TorchScript archive `source` whose data.pkl is replaced."""
  with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w") as zout:
    for name in zin.namelist():
      zout.writestr(name, pkl if name.endswith("/data.pkl") else zin.read(name))
  return dest


def test_malicious_files_are_refused_without_running_code(traced_archive, tmp_path):
  marker = tmp_path / "marker"
  payload = {"visual.conv1.weight": _WritesMarker(marker)}
  plain = tmp_path / "plain.pt"
  plain.write_bytes(pickle.dumps(payload, protocol=2))
  saved = tmp_path / "saved.pt"
  torch.save(payload, saved)
  archive = _archive_with_pkl(traced_archive, tmp_path / "archive.pt",
                              pickle.dumps(payload, protocol=2))
  cases = {plain: "plain pickle", saved: "posix.system", archive: "posix.system"}
  for path, words in cases.items():
    with pytest.raises(CheckpointError, match=words) as e:
      read_state_dict(path)
    assert "\n" not in str(e.value) and "refuse" in str(e.value)
  assert not marker.exists()


def test_archive_tensor_outside_its_storage_is_refused(traced_archive, tmp_path):
  broken = tmp_path / "short_storage.pt"
  with zipfile.ZipFile(traced_archive) as zin, zipfile.ZipFile(broken, "w") as zout:
    for name in zin.namelist():
      data = zin.read(name)
      zout.writestr(name, data[:4] if name.endswith("/data/0") else data)
  with pytest.raises(CheckpointError, match="outside its storage"):
    read_torchscript(str(broken))


# ----------------------------------------------------------------------------- torch.save, safetensors


def test_torch_save_wrapped_half_state_dict(model, tmp_path):
  want = numpy_state_dict(model)
  path = tmp_path / "wrapped.pt"
  torch.save({"epoch": 3, "state_dict": {k: v.half() for k, v in model.state_dict().items()}},
             path)
  got = read_state_dict(path)
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key].dtype == np.float32
    assert np.array_equal(got[key], value.astype(np.float16).astype(np.float32)), key


def test_legacy_torch_save_format(model, tmp_path):
  torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  got = read_state_dict(tmp_path / "legacy.pt")
  assert all(np.array_equal(got[k], v) for k, v in numpy_state_dict(model).items())


def test_safetensors_bf16_and_round_trip(tmp_path):
  from safetensors.torch import save_file
  tensors = {"a": torch.randn(3, 2).bfloat16(), "b": torch.arange(4)}
  save_file(tensors, tmp_path / "bf.safetensors")
  got = read_state_dict(tmp_path / "bf.safetensors")
  assert got["a"].dtype == np.float32 and np.array_equal(got["a"], tensors["a"].float().numpy())
  assert got["b"].dtype == np.int64

  arrays = {"w": np.random.randn(3, 4).astype(np.float32).T, "s": np.array(2.5, np.float32)}
  write_safetensors_atomic(tmp_path / "out.safetensors", arrays, {"format": "pt"})
  back = read_state_dict(tmp_path / "out.safetensors")
  assert back["s"].shape == () and all(np.array_equal(back[k], arrays[k]) for k in arrays)
  assert sorted(os.listdir(tmp_path)) == ["bf.safetensors", "out.safetensors"]


def test_torch_writer_round_trip(tmp_path):
  arrays = {"w": np.random.randn(3, 4).astype(np.float32), "s": np.array(2.5, np.float32)}
  write_torch_atomic(tmp_path / "out.pt", arrays)
  back = read_state_dict(tmp_path / "out.pt")
  assert back["s"].shape == () and all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_failed_write_leaves_nothing(tmp_path):
  with pytest.raises(Exception):
    write_safetensors_atomic(tmp_path / "x.safetensors", {"bad": np.array(["text"])})
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name,content,words", [
    ("missing.pt", None, "does not exist"),
    ("folder", "dir", "is a directory"),
    ("trunc.safetensors", "trunc_safetensors", "truncated or not a valid safetensors"),
    ("trunc.pt", "trunc_zip", "truncated or corrupt"),
    ("junk.bin", b"certainly not a checkpoint", "not a recognised tensor file"),
    ("other.zip", "zip", "neither a torch checkpoint nor a TorchScript"),
    ("model.pt", "module", "not a tensor"),
])
def test_bad_files_get_one_sentence(tmp_path, name, content, words):
  path = tmp_path / name
  if content == "dir":
    path.mkdir()
  elif content == "trunc_safetensors":
    write_safetensors_atomic(path, {"w": np.ones((8, 8), np.float32)})
    path.write_bytes(path.read_bytes()[:-10])
  elif content == "trunc_zip":
    torch.save({"w": torch.ones(8, 8)}, path)
    path.write_bytes(path.read_bytes()[:200])
  elif content == "zip":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("readme.txt", "hello")
  elif content == "module":
    torch.save({"w": torch.ones(2), "step": 7}, path)
  elif content is not None:
    path.write_bytes(content)
  with pytest.raises(CheckpointError, match=words) as e:
    read_state_dict(path)
  assert "\n" not in str(e.value) and str(e.value).endswith(".")


# ----------------------------------------------------------------------------- HF folders


def _hf_folder(path, weights: dict[str, dict]):
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  for name, tensors in weights.items():
    if name.endswith(".safetensors"):
      write_safetensors_atomic(path / name, tensors, {"format": "pt"})
    elif name.endswith(".json"):
      (path / name).write_text(json.dumps(tensors))
    else:
      torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path / name)
  return path


def test_hf_folders(tmp_path):
  a, b = {"a": np.ones(2, np.float32)}, {"b": np.zeros(3, np.float32)}
  sd, cfg = read_hf_folder(_hf_folder(tmp_path / "single", {"model.safetensors": {**a, **b}}))
  assert set(sd) == {"a", "b"} and cfg == {"model_type": "clip"}
  index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
  sharded = _hf_folder(tmp_path / "sharded", {"model-1.safetensors": a, "model-2.safetensors": b,
                                               "model.safetensors.index.json": index})
  assert set(read_hf_folder(sharded)[0]) == {"a", "b"}
  # pytorch_model.bin is accepted because torch.load(weights_only=True) can read it safely.
  assert set(read_hf_folder(_hf_folder(tmp_path / "bin", {"pytorch_model.bin": a}))[0]) == {"a"}


def test_hf_folder_refusals(tmp_path):
  only_flax = _hf_folder(tmp_path / "flax_only", {})
  (only_flax / "flax_model.msgpack").write_bytes(b"\x80")
  with pytest.raises(CheckpointError, match="found: config.json, flax_model.msgpack"):
    read_hf_folder(only_flax)
  (tmp_path / "no_config").mkdir()
  with pytest.raises(CheckpointError, match="no config.json"):
    read_hf_folder(tmp_path / "no_config")
  with pytest.raises(CheckpointError, match="does not exist"):
    read_hf_folder(tmp_path / "absent")
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="is a file"):
    read_hf_folder(tmp_path / "file")
