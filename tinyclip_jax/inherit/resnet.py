"""Manual weight inheritance for ResNet image towers, as TinyCLIP's reference does it
(`weight_inherit.py`, its `visual.layer{stage}.{block}` pattern).

Depth, per stage: student block i of a stage with S blocks copies teacher block i·k
of the same stage, k = T // S (the interval rule of the transformer layers, applied
to each stage on its own). Width: every tensor — convolutions (kh, kw, in, out),
BatchNorm scale, bias and running statistics, the attention pool's positional
embedding and projections — is cut to its leading corner, the first channels of
every axis. The attention pool's heads are contiguous 64-channel groups, so its
first channels are its first heads. The text tower follows `manual`.
"""
from __future__ import annotations

import re
from typing import Sequence

from tinyclip_jax.inherit.depth import InheritError, uniform_layer_indices
from tinyclip_jax.models.config import VisionConfig

BLOCK = re.compile(r"layer(\d+)_(\d+)$")


def check_vision(t: VisionConfig, s: VisionConfig, layer_indices=None) -> dict[int, list[int]]:
  """Validates a teacher/student image-tower pair of which at least one is a ResNet;
  returns {stage: teacher block behind each student block}."""
  if t.kind != s.kind:
    raise InheritError(f"the teacher's image tower is a {t.kind} and the student's a {s.kind}; "
                       "manual inheritance needs towers of the same kind (init the student "
                       "from scratch or pick a teacher of its kind).")
  if layer_indices is not None:
    raise InheritError("layer_indices for a ResNet image tower are not supported; its blocks "
                       "are chosen per stage by the interval rule (drop "
                       "layer_indices['visual']).")
  for field in ("image_size", "head_dim"):
    if getattr(s, field) != getattr(t, field):
      raise InheritError(f"student vision {field} {getattr(s, field)} differs from teacher "
                         f"vision {field} {getattr(t, field)}, which slicing cannot fix; pick a "
                         f"teacher with the same {field}.")
  if s.width > t.width:
    raise InheritError(f"student vision width {s.width} exceeds teacher vision width "
                       f"{t.width}; pick a student no wider than its teacher.")
  idx = {}
  for stage, (sn, tn) in enumerate(zip(s.stages, t.stages), start=1):
    if sn > tn:
      raise InheritError(f"student ResNet stage {stage} has {sn} blocks but the teacher's has "
                         f"{tn}; pick a student no deeper than its teacher in every stage.")
    idx[stage] = uniform_layer_indices(tn, sn)
  return idx


def source_path(path: Sequence[str], idx: dict[int, list[int]]) -> tuple[str, ...]:
  """The teacher path a student weight is cut from: blocks renumbered per stage."""
  match = BLOCK.match(path[1]) if len(path) > 2 and path[0] == "visual" else None
  if match is None:
    return tuple(path)
  stage, block = int(match.group(1)), int(match.group(2))
  return (path[0], f"layer{stage}_{idx[stage][block]}") + tuple(path[2:])
