"""Shared pieces of the checkpoint maps: errors, key flattening, strict shape checks,
and the tensor layout changes between PyTorch modules and the canonical params.

Every map is pure numpy. Layout changes are transposes and reshapes only, so a
round trip through any foreign format is bit-exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np

SEP = "/"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model (or is not a supported CLIP at all)."""


# ----------------------------------------------------------------------------- trees

def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts → {'visual/layers_0/ln_1/scale': leaf, ...}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{SEP}{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`: '/'-joined keys → plain nested dicts."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in getattr(x, "shape", np.shape(x)))


def check_params(params: Mapping[str, Any], config) -> None:
  """Raises CheckpointError unless `params` has exactly the leaves and shapes that
  `tinyclip_jax.models.param_shapes(config)` has (dtypes are not checked)."""
  from tinyclip_jax.convert.resnet import kind_mismatch  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import param_shapes  # jax import only when checking
  mismatch = kind_mismatch(params, config)
  if mismatch:
    raise CheckpointError(mismatch)
  want = {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}
  got = {k: _shape(v) for k, v in flatten(params).items()}
  problems = []
  for key in sorted(want.keys() - got.keys()):
    problems.append(f"param `{key}` is missing (the config expects shape {want[key]}, the "
                    "checkpoint has none); convert a checkpoint of this model or fix the config")
  for key in sorted(got.keys() - want.keys()):
    problems.append(f"param `{key}` with shape {got[key]} is not used by the config (which "
                    "expects no such param, shape None); drop it or fix the config")
  for key in sorted(k for k in want.keys() & got.keys() if want[k] != got[k]):
    problems.append(f"param `{key}` has shape {got[key]} but the config expects {want[key]}; "
                    "fix the config or the checkpoint so they describe the same model")
  if problems:
    more = f" ({len(problems) - 1} more problems follow the same pattern)" if len(problems) > 1 else ""
    raise CheckpointError(problems[0] + more + ".")


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
