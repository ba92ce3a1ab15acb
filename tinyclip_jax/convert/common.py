"""Shared pieces of the checkpoint maps: the tensor layout changes between PyTorch
modules and the canonical params, and the key and shape helpers every format uses.
The parameter-tree helpers (flatten, the strict check, the load error) are the
model's (`tinyclip_jax.models.params`); they are re-exported here for the formats.

Every map is pure numpy. Layout changes are transposes and reshapes only, so a
round trip through any foreign format is bit-exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from tinyclip_jax.models.params import (SEP, CheckpointError, check_params, flatten,  # noqa: F401
                                        unflatten)


# ----------------------------------------------------------------------------- tensors

def as_f32(x) -> np.ndarray:
  """float16/bfloat16/float32 → float32 (no copy when already float32)."""
  return np.asarray(x, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one PyTorch tensor becomes one canonical leaf and back. `to_canonical`
  gets the tower's head_dim (only attention projections need it)."""
  to_canonical: Callable[[np.ndarray, int], np.ndarray]
  from_canonical: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda x, d: x, lambda x: x)
# torch Linear weight (out, in) ↔ flax kernel (in, out).
LINEAR = Layout(lambda w, d: w.T, lambda k: k.T)
# torch Conv2d (W, 3, p, p) ↔ (p, p, 3, W), the order the model flattens patches in.
CONV = Layout(lambda w, d: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
# Fused qkv weight (3*H*d, W), rows [q; k; v] head-major ↔ (W, 3, H, d).
IN_PROJ = Layout(lambda w, d: w.reshape(3, -1, d, w.shape[-1]).transpose(3, 0, 1, 2),
                 lambda k: k.transpose(1, 2, 3, 0).reshape(-1, k.shape[0]))
IN_BIAS = Layout(lambda b, d: b.reshape(3, -1, d), lambda b: b.reshape(-1))
# out_proj Linear weight (W, H*d) ↔ (H, d, W).
OUT_PROJ = Layout(lambda w, d: w.T.reshape(-1, d, w.shape[0]),
                  lambda k: k.reshape(-1, k.shape[-1]).T)
# open_clip's nonscalar_logit_scale stores shape (1,); the model's is ().
SCALAR = Layout(lambda x, d: x.reshape(()) if x.size == 1 else x, lambda x: np.reshape(x, ()))


def to_canonical(layout: Layout, key: str, x, head_dim: int) -> np.ndarray:
  x = as_f32(x)
  try:
    return layout.to_canonical(x, head_dim)
  except ValueError as e:
    raise CheckpointError(f"tensor `{key}` has shape {tuple(x.shape)}, which cannot be laid out "
                          f"as the model's parameter ({e}); the checkpoint's shapes are "
                          "inconsistent with each other.") from e


def from_canonical(layout: Layout, x) -> np.ndarray:
  # C order for safetensors; not ascontiguousarray, which turns a 0-d logit_scale into (1,).
  return np.asarray(layout.from_canonical(as_f32(x)), order="C")


# ----------------------------------------------------------------------------- misc

def block_numbers(keys: Iterable[str], prefix: str) -> set[int]:
  """The block indices N of keys '<prefix>N.<rest>'."""
  found = set()
  for key in keys:
    if key.startswith(prefix):
      head = key[len(prefix):].split(".", 1)[0]
      if not head.isdigit():
        raise CheckpointError(f"key `{key}` has `{head}` where a block index was expected; "
                              f"keys under `{prefix}` must look like `{prefix}0.ln_1.weight`.")
      found.add(int(head))
  return found


def layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
  """Sorted block indices N of keys '<prefix>N.<rest>'; raises if they skip a number."""
  found = block_numbers(keys, prefix)
  indices = sorted(found)
  if indices != list(range(len(indices))):
    missing = sorted(set(range(max(indices) + 1)) - found)
    raise CheckpointError(f"blocks `{prefix}N` are numbered {indices} but block(s) {missing} "
                          "are absent; the checkpoint is truncated or was saved incompletely.")
  return indices


def require(sd: Mapping[str, np.ndarray], key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise CheckpointError(f"key `{key}` ({what}) is missing from the checkpoint; it is not a "
                          "complete CLIP state dict.")
  return sd[key]


def dims(sd: Mapping[str, Any], key: str, ndim: int, what: str) -> tuple[int, ...]:
  """The shape of tensor `key`, which must be `ndim`-D."""
  shape = tuple(np.shape(require(sd, key, what)))
  if len(shape) != ndim:
    raise CheckpointError(f"`{key}` ({what}) has shape {shape} but a {ndim}-D tensor was "
                          "expected; the checkpoint is not a standard CLIP ViT.")
  return shape


def tower_layout(tower, name: str, fmt: str) -> tuple[int, int]:
  """(heads, mlp) of a tower whose layers are all alike, or CheckpointError: the
  PyTorch modules of `fmt` build every block with the same widths."""
  heads, mlp = tower.heads, tower.mlp
  if not tower.uniform or not heads or heads[0] == 0 or mlp[0] == 0:
    raise CheckpointError(
        f"the {name} tower has per-layer heads {list(heads)} and MLP widths {list(mlp)}, but "
        f"{fmt} needs uniform layers with attention and MLP in every block; pad the pruned "
        "model first with `tinyclip_jax.convert.pad.pad_uniform`.")
  if heads[0] * tower.head_dim != tower.width:
    raise CheckpointError(
        f"the {name} tower has {heads[0]} heads of {tower.head_dim} channels but width "
        f"{tower.width}; {fmt} needs heads * head_dim == width.")
  return heads[0], mlp[0]


def take_entries(sd: Mapping[str, Any], entries) -> tuple[dict, list[str]]:
  """(canonical flat params, sorted unused keys) for (key, path, layout, head_dim)
  entries read from a normalized state dict."""
  flat, used = {}, set()
  for key, path, layout, hd in entries:
    flat[path] = to_canonical(layout, key, require(sd, key, path), hd)
    used.add(key)
  return flat, sorted(sd.keys() - used)
