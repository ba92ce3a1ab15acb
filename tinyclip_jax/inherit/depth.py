"""TinyCLIP's depth rule, shared by the transformer towers (`manual`) and the ResNet
stages (`resnet`), and the error of a student its teacher cannot give weights to."""
from __future__ import annotations


class InheritError(ValueError):
  """A student that cannot be cut out of its teacher."""


def uniform_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
  """TinyCLIP's depth rule: teacher layers 0, k, 2k, ... with k = T // S."""
  if not 0 <= student_layers <= teacher_layers:
    raise InheritError(f"a student of {student_layers} layers cannot inherit from a teacher "
                       f"of {teacher_layers} layers; pick a student no deeper than its teacher.")
  if student_layers == 0:
    return []
  k = teacher_layers // student_layers
  return list(range(0, student_layers * k, k))
