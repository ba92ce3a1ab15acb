"""Manual weight inheritance (TinyCLIP): a student takes a uniform subset of its
teacher's layers and the first channels of every dimension.

Depth: student layer i of a tower with S layers copies teacher layer i·k, where
k = T // S (T teacher layers). Width: the canonical layout (models/clip.py) keeps
heads on their own axis — in_proj_kernel (W, 3, H, 64), out_proj_kernel
(H, 64, W) — so "the first channels of every dimension" is, for every tensor,
its leading corner x[:s0, :s1, ...] cut to the student's shape, and the first
heads of q, k and v stay together. Dimensions whose meaning slicing would change
(patch size, position count, context length, vocab size, head_dim) must match;
they are checked on the configs before anything is sliced.

Pure slicing over nested dicts of numpy or jax arrays: works under jit and
jax.eval_shape, and preserves dtypes. No torch here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from tinyclip_jax.inherit import resnet
# Re-exported: the depth rule and its error are part of this module's interface.
from tinyclip_jax.inherit.depth import InheritError, uniform_layer_indices  # noqa: F401
from tinyclip_jax.models.clip import param_shapes
from tinyclip_jax.models.config import CLIPConfig, TowerConfig

TOWERS = {"visual": "vision", "text": "text"}  # param key → config field and name
# How to finish "pick a student no ... than its teacher" for each dimension.
_ADJ = {"width": "wider", "layers": "deeper", "embed_dim": "wider"}


def _too_big(what: str, s, t):
  dim = what.rsplit(" ", 1)[-1]
  return InheritError(f"student {what} {s} exceeds teacher {what} {t}; "
                      f"pick a student no {_ADJ.get(dim, 'larger')} than its teacher.")


def _differs(what: str, s, t):
  return InheritError(f"student {what} {s} differs from teacher {what} {t}, which slicing "
                      f"cannot fix; pick a teacher with the same {what.split(' ', 1)[-1]}.")


def _check_tower(name: str, t: TowerConfig, s: TowerConfig, idx: Sequence[int] | None):
  """Validates one tower pair and returns the teacher layer behind each student layer."""
  fixed = ["head_dim"] + {"vision": ["patch_size", "image_size"],
                          "text": ["context_length", "vocab_size"]}[name]
  for field in fixed:  # these change meaning when sliced, so they must match exactly
    if getattr(s, field) != getattr(t, field):
      raise _differs(f"{name} {field}", getattr(s, field), getattr(t, field))
  if s.width > t.width:
    raise _too_big(f"{name} width", s.width, t.width)
  if s.layers > t.layers:
    raise _too_big(f"{name} layers", s.layers, t.layers)
  if idx is None:
    idx = uniform_layer_indices(t.layers, s.layers)
  idx = [int(j) for j in idx]
  if len(idx) != s.layers or any(not 0 <= j < t.layers for j in idx) or idx != sorted(set(idx)):
    raise InheritError(f"{name} layer_indices {idx} must be {s.layers} increasing teacher "
                       f"layer indices in [0, {t.layers}), one per student layer.")
  for i, j in enumerate(idx):
    for what, sv, tv in (("heads", s.heads[i], t.heads[j]), ("mlp", s.mlp[i], t.mlp[j])):
      if sv > tv == 0:
        raise InheritError(f"student {name} layer {i} has {what} {sv} but teacher {name} "
                           f"layer {j} has none (pruned); give that student layer {what} 0 "
                           f"or inherit it from another teacher layer.")
      if sv > tv:
        raise InheritError(f"student {name} layer {i} {what} {sv} exceeds teacher {name} "
                           f"layer {j} {what} {tv}; pick a student no wider than its teacher.")
  return idx


def _check(teacher: CLIPConfig, student: CLIPConfig,
           layer_indices: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
  layer_indices = dict(layer_indices or {})
  unknown = set(layer_indices) - set(TOWERS)
  if unknown:
    raise InheritError(f"layer_indices has keys {sorted(unknown)}; use 'visual' and/or 'text'.")
  if student.embed_dim > teacher.embed_dim:
    raise _too_big("embed_dim", student.embed_dim, teacher.embed_dim)
  out = {}
  for key, name in TOWERS.items():
    t, s = getattr(teacher, name), getattr(student, name)
    if name == "vision" and "resnet" in (t.kind, s.kind):  # blocks chosen per stage
      out[key] = resnet.check_vision(t, s, layer_indices.get(key))
    else:
      out[key] = _check_tower(name, t, s, layer_indices.get(key))
  return out


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@functools.lru_cache(maxsize=32)
def _shapes(config: CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  # Cached: tracing a model init costs about a second for ViT-B sizes.
  return {p: tuple(x.shape) for p, x in _flatten(param_shapes(config))}


def _match(flat: dict, expected: dict, what: str):
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or extra:
    raise InheritError(f"{what} lack {['/'.join(p) for p in missing[:3]]} and have unexpected "
                       f"{['/'.join(p) for p in extra[:3]]} ({len(missing)} missing, "
                       f"{len(extra)} extra).")
  for p, shape in expected.items():
    if tuple(np.shape(flat[p])) != shape:
      raise InheritError(f"{what}: {'/'.join(p)} has shape {tuple(np.shape(flat[p]))} "
                         f"where {shape} is expected.")


def _corner(x, shape: tuple[int, ...]):
  """The leading corner of x with the given shape (first channels of every axis)."""
  y = x[tuple(slice(0, n) for n in shape)]
  # numpy slices are views: copy so the student never aliases (or pins) the teacher.
  return np.array(y) if isinstance(x, np.ndarray) else y


def inherit(teacher_params, teacher_config: CLIPConfig, student_config: CLIPConfig, *,
            layer_indices: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
  """The student's params cut out of the teacher's (TinyCLIP manual inheritance).

  layer_indices: per tower ('visual', 'text'), the teacher layer behind each
  student layer; towers left out use uniform_layer_indices (per stage for ResNet
  image towers, see inherit/resnet.py; BatchNorm running statistics are sliced too).
  Returns a new nested dict with exactly the structure and shapes of
  param_shapes(student_config).
  Raises InheritError when the student is larger than the teacher in any
  dimension or differs in one that slicing cannot fix.
  """
  idx = _check(teacher_config, student_config, layer_indices)
  flat = dict(_flatten(teacher_params))
  _match(flat, _shapes(teacher_config), "teacher params (checked against teacher_config)")
  student_shapes = _shapes(student_config)
  out: dict[str, Any] = {}
  for path, shape in student_shapes.items():
    src = path
    if len(path) > 2 and path[1].startswith("layers_"):
      src = (path[0], f"layers_{idx[path[0]][int(path[1][7:])]}") + path[2:]
    elif isinstance(idx.get(path[0]), dict):  # ResNet stages: block i of stage s
      src = resnet.source_path(path, idx[path[0]])
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = _corner(flat[src], shape)
  _match(dict(_flatten(out)), student_shapes, "inherited params (a bug in inherit)")
  return out


def student_config_from(teacher_config: CLIPConfig, *, vision_layers: int | None = None,
                        vision_width: int | None = None, text_layers: int | None = None,
                        text_width: int | None = None, embed_dim: int | None = None
                        ) -> CLIPConfig:
  """A student shaped like its teacher but shallower and/or narrower.

  Each student layer takes the heads and MLP width of the teacher layer it will
  inherit from, scaled by width / teacher width (so 768 wide with 12 heads and
  MLP 3072 becomes 512 wide with 8 heads and MLP 2048).
  """
  def shrink(t: TowerConfig, layers, width):
    layers = t.layers if layers is None else layers
    width = t.width if width is None else width
    idx = uniform_layer_indices(t.layers, layers)
    return dataclasses.replace(t, width=width,
                               heads=tuple(t.heads[j] * width // t.width for j in idx),
                               mlp=tuple(t.mlp[j] * width // t.width for j in idx))

  return teacher_config.replace(
      embed_dim=teacher_config.embed_dim if embed_dim is None else embed_dim,
      vision=shrink(teacher_config.vision, vision_layers, vision_width),
      text=shrink(teacher_config.text, text_layers, text_width))
