"""The mixed-precision policy: which dtype every part of a train step runs in.

Stated here once; the models, the step and the loss read it.

  parameters and optimizer state   float32 (always)
  tower compute (student)          `compute_dtype`: bfloat16 on GPU/TPU, float32 on CPU
  teacher forward                  the same, under stop_gradient (train/step.py)
  embeddings, affinity logits,     float32 (always): the towers cast their projected
  softmax and loss                 output, the loss accumulates in float32
  LayerNorm statistics, attention  float32 inside a bf16 tower
  softmax

config `precision`: "auto" (bf16 on accelerators, f32 on CPU, where bf16 matmuls are
emulated and slower), or "float32" / "bfloat16" on any platform — float32 stays
available everywhere for the exactness tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

PARAM_DTYPE = jnp.float32    # parameters, gradients, optimizer state
OUTPUT_DTYPE = jnp.float32   # tower outputs, affinity logits, softmax, loss
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISIONS = ("auto", *COMPUTE_DTYPES)
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Policy:
  """compute_dtype: the student's towers; teacher_dtype: the teacher's forward;
  attention: `implementation` for jax.nn.dot_product_attention — "cudnn" (the fused
  flash kernel; a shape or dtype it cannot take falls back to XLA while tracing) or
  None (XLA)."""
  compute_dtype: Any
  teacher_dtype: Any
  attention: str | None = None
  param_dtype: Any = PARAM_DTYPE
  output_dtype: Any = OUTPUT_DTYPE

  @property
  def name(self) -> str:
    return jnp.dtype(self.compute_dtype).name

  @property
  def student_kw(self) -> dict:
    """Keyword arguments of models.CLIP for the student."""
    return dict(dtype=self.compute_dtype, param_dtype=self.param_dtype,
                attention=self.attention)

  @property
  def teacher_kw(self) -> dict:
    return dict(dtype=self.teacher_dtype, param_dtype=self.param_dtype,
                attention=self.attention)


def policy_for(precision: str, platform: str) -> Policy:
  """The policy of config `precision` on devices of `platform` (jax Device.platform)."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r} is unknown; use 'auto', 'float32' or "
                     "'bfloat16'.")
  if precision == "auto":
    precision = "bfloat16" if platform in ACCELERATORS else "float32"
  dtype = COMPUTE_DTYPES[precision]
  # cuDNN's flash attention takes bf16/fp16 only; XLA's attention everywhere else.
  attention = "cudnn" if platform in ("gpu", "cuda") and dtype == jnp.bfloat16 else None
  return Policy(compute_dtype=dtype, teacher_dtype=dtype, attention=attention)
