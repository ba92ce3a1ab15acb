"""Reading and writing tensor files without running code stored in them.

Accepted inputs: .safetensors; torch.save checkpoints (loaded with
weights_only=True); TorchScript archives such as OpenAI's released ViT-B-32.pt,
whose tensors are read by a restricted unpickler that builds nothing but numpy
arrays and inert placeholders (torch.jit.load would execute the archive's code).
Plain pickles are refused: unpickling them can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from tinyclip_jax.convert.common import CheckpointError

ACCEPTED = ("accepted formats are .safetensors, torch.save checkpoints (.pt/.bin, read with "
            "weights_only=True) and TorchScript archives (tensors only)")
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-1.6 format

# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A flat {name: array} state dict from a tensor file; fp16/bf16 become float32."""
  path = os.fspath(path)
  _require_file(path)
  kind = _sniff(path)
  if kind == "safetensors":
    sd = _read_safetensors(path)
  elif kind == "zip":
    sd = _read_zip(path)
  elif kind == "legacy_torch":
    sd = _read_torch_save(path)
  elif kind == "broken_zip":
    raise CheckpointError(f"{path} starts like a zip archive (torch checkpoint) but its "
                          "directory is missing; the file is truncated or corrupt.")
  elif kind == "pickle":
    raise CheckpointError(f"{path} is a plain pickle, which can run arbitrary code when "
                          f"loaded, so it is refused; {ACCEPTED}.")
  else:
    raise CheckpointError(f"{path} is not a recognised tensor file; {ACCEPTED}.")
  if not sd:
    raise CheckpointError(f"{path} holds no tensors; expected a model state dict.")
  return {k: _upcast(v) for k, v in sd.items()}


def _require_file(path: str) -> None:
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist; give the path of a checkpoint file.")
  if os.path.isdir(path):
    raise CheckpointError(f"{path} is a directory, but a checkpoint file was expected here "
                          f"({ACCEPTED}).")


def _sniff(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(16)
  if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
    return "safetensors"
  if zipfile.is_zipfile(path):
    return "zip"
  if head[:4] == b"PK\x03\x04":
    return "broken_zip"
  if head[:1] == b"\x80":  # pickle protocol >= 2
    return "legacy_torch" if _is_legacy_torch(path) else "pickle"
  return "unknown"


def _is_legacy_torch(path: str) -> bool:
  """True when the file's first pickle is torch's magic number (read with no globals)."""
  with open(path, "rb") as f:
    try:
      return _NoGlobals(f).load() == _LEGACY_TORCH_MAGIC
    except Exception:  # noqa: BLE001 - anything unreadable is simply "not legacy torch"
      return False


class _NoGlobals(pickle.Unpickler):
  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _upcast(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) if x.dtype in (np.float16, ml_dtypes.bfloat16) else x


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)  # importing ml_dtypes lets numpy name bfloat16
  except SafetensorError as e:
    raise CheckpointError(f"{path} is truncated or not a valid safetensors file ({e}).") from None


def _read_zip(path: str) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
  pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
  if not pkls:
    raise CheckpointError(f"{path} is a zip archive without a data.pkl, so it is neither a "
                          f"torch checkpoint nor a TorchScript archive; {ACCEPTED}.")
  prefix = pkls[0][: -len("data.pkl")]
  if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
    return read_torchscript(path)
  return _read_torch_save(path)


# --------------------------------------------------------------------------- torch.save


def _read_torch_save(path: str) -> dict[str, np.ndarray]:
  import torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"the global {found.group(1)}" if found else "Python objects other than tensors"
    raise CheckpointError(f"{path} needs {what} to load, which weights_only=True refuses "
                          f"because it could run code; {ACCEPTED}.") from None
  except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{path} could not be read as a torch checkpoint ({first}); it may "
                          "be truncated or corrupt.") from None
  return _torch_state_dict(obj, path)


def _torch_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  import torch
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]  # training checkpoints (e.g. TinyCLIP's) wrap the weights
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path} entry `{key}` is a {type(value).__name__}, not a tensor; "
                            "expected a flat state dict (optionally under 'state_dict').")
    value = value.detach().cpu()
    if value.dtype in (torch.float16, torch.bfloat16):
      value = value.float()  # bfloat16 has no plain numpy dtype
    out[str(key)] = value.numpy()
  return out


# --------------------------------------------------------------------------- TorchScript

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _ScriptObject:
  """Stands in for any `__torch__.*` class: keeps the state the pickle gives it, runs nothing."""

  def __init__(self, *args, **kwargs):
    self.state = None

  def __setstate__(self, state):
    self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """numpy version of torch._utils._rebuild_tensor(_v2), bounds-checked."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = int(offset) + sum((n - 1) * st for n, st in zip(size, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise pickle.UnpicklingError("a tensor reaches outside its storage")
  if np.prod(size, dtype=np.int64) > storage.size:  # stride-0 views could inflate memory
    raise pickle.UnpicklingError("a tensor has more elements than its storage")
  base = storage[int(offset):]
  strides = tuple(st * storage.itemsize for st in stride)
  return np.lib.stride_tricks.as_strided(base, size, strides, writeable=False).copy()


def _first(value, *unused):
  """_rebuild_parameter(data, ...) and TorchScript's typed-list builders: the value itself."""
  return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _first,
    ("collections", "OrderedDict"): dict,  # the (empty) backward-hooks argument
    **{("torch.jit._pickle", f"build_{t}list"): _first
       for t in ("int", "float", "bool", "double", "tensor")},
    ("torch.jit._pickle", "restore_type_tag"): _first,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _TorchScriptUnpickler(pickle.Unpickler):
  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, big_endian: bool):
    super().__init__(file)
    self._zf, self._prefix, self._big = zf, prefix, big_endian
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if module == "__torch__" or module.startswith("__torch__."):
      return _ScriptObject
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(f"it needs the global {module}.{name}, which is not a tensor "
                                 "rebuild function")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"it has an unexpected persistent id {pid!r}")
    key, dtype = str(pid[2]), pid[1].dtype
    if key not in self._storages:
      raw = self._zf.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, dtype.newbyteorder(">") if self._big else dtype)
    return self._storages[key]


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive's module tree as a flat `a.b.c` dict."""
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = next(n for n in names if n.endswith("data.pkl") and n.count("/") <= 1)
    prefix = pkl[: -len("data.pkl")]
    big = f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() == b"big"
    try:
      with zf.open(pkl) as f:
        root = _TorchScriptUnpickler(f, zf, prefix, big).load()
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
            AttributeError, IndexError, zipfile.BadZipFile) as e:
      raise CheckpointError(f"{path} looks like a TorchScript archive but is refused because "
                            f"{e}; {ACCEPTED}.".replace("\n", " ")) from None
  if not isinstance(root, _ScriptObject):
    raise CheckpointError(f"{path} is a TorchScript archive whose root is not a module.")
  return _walk(root, "")


def _walk(obj: _ScriptObject, prefix: str) -> dict[str, np.ndarray]:
  """Tensors reachable through module attributes, keyed like Module.state_dict()."""
  out = {}
  state = obj.state if isinstance(obj.state, Mapping) else {}
  for name, value in state.items():
    if isinstance(value, np.ndarray):
      out[prefix + str(name)] = value
    elif isinstance(value, _ScriptObject):
      out.update(_walk(value, f"{prefix}{name}."))
  return out


# --------------------------------------------------------------------------- HF folders

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def read_hf_folder(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict, config.json) of a Hugging Face model folder."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist; give a Hugging Face model folder.")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is a file, but a Hugging Face model folder (config.json + "
                          "model.safetensors) was expected.")
  found = sorted(os.listdir(path))
  listing = ", ".join(found[:8]) + (" …" if len(found) > 8 else "") or "nothing"
  if "config.json" not in found:
    raise CheckpointError(f"{path} has no config.json (found: {listing}), so it is not a "
                          "Hugging Face model folder.")
  weights = next((w for w in _HF_WEIGHTS if w in found), None)
  if weights is None:
    raise CheckpointError(f"{path} has config.json but none of {', '.join(_HF_WEIGHTS)} "
                          f"(found: {listing}).")
  config = _read_json(os.path.join(path, "config.json"))
  if weights.endswith(".index.json"):
    return _read_shards(path, weights), config
  return read_state_dict(os.path.join(path, weights)), config


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not readable JSON ({e}).") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
  return value


def _read_shards(folder: str, index_name: str) -> dict[str, np.ndarray]:
  weight_map = _read_json(os.path.join(folder, index_name)).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{os.path.join(folder, index_name)} has no weight_map.")
  out = {}
  for shard in sorted(set(weight_map.values())):
    out.update(read_state_dict(os.path.join(folder, shard)))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise CheckpointError(f"{index_name} lists `{missing[0]}` but no shard holds it.")
  return out


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write_fn) -> None:
  """Calls write_fn(file object) on a temporary file next to `path`, fsyncs, renames."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass  # not every filesystem can fsync a directory


def write_safetensors_atomic(path, tensors: Mapping[str, Any],
                             metadata: Mapping[str, str] | None = None) -> None:
  from safetensors.numpy import save
  # asarray, not ascontiguousarray: the latter turns 0-d arrays (logit_scale) into 1-d.
  arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
  data = save(arrays, metadata=dict(metadata) if metadata else None)
  atomic_write(path, lambda f: f.write(data))


def write_torch_atomic(path, tensors: Mapping[str, Any], wrap: str | None = None) -> None:
  """torch.save of {name: tensor} (what open_clip's loaders read), or of
  {wrap: {name: tensor}} when `wrap` is given, atomically."""
  import torch
  sd = {k: torch.from_numpy(np.asarray(v, order="C")) for k, v in tensors.items()}
  obj = {wrap: sd} if wrap else sd
  atomic_write(path, lambda f: torch.save(obj, f))
