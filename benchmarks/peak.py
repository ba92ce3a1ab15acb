"""Peak FLOP/s of the device a benchmark runs on, for model FLOPs utilization (MFU).

Accelerators: the vendor's dense bfloat16 peak per chip (no sparsity), looked up by
`jax.devices()[0].device_kind`. CPU: no meaningful datasheet figure, so the peak is
measured — the best of a few large matmuls in XLA on this machine, in the run's dtype.
MFU = model FLOP/s ÷ (peak per device × devices); on CPU the simulated devices share
one machine, so the measured peak is the whole machine's and is not multiplied.
"""
from __future__ import annotations

import time

# Dense bf16 FLOP/s per chip. TPUs by their exact device_kind ("TPU v4 lite", an
# inference chip, must not pass for a v4)...
TPU_PEAKS = {
    "TPU v4": (275e12, "TPU v4"),
    "TPU v5 lite": (197e12, "TPU v5e"),
    "TPU v5e": (197e12, "TPU v5e"),
    "TPU v5": (459e12, "TPU v5p"),  # v5p chips report "TPU v5"
    "TPU v5p": (459e12, "TPU v5p"),
    "TPU v6 lite": (918e12, "TPU v6e"),
    "TPU v6e": (918e12, "TPU v6e"),
}
# ...GPUs by a substring of theirs ("NVIDIA H100 80GB HBM3"); the first match wins, so
# the more specific names come first.
GPU_PEAKS = (
    ("H100 PCIe", 756e12, "H100 PCIe"),
    ("H100 NVL", 835e12, "H100 NVL"),
    ("H100", 989e12, "H100 SXM"),
    ("H200 NVL", 835e12, "H200 NVL"),
    ("H200", 989e12, "H200 SXM"),
    ("A100", 312e12, "A100"),
)


def table_peak(device_kind: str) -> tuple[float, str] | None:
  """(bf16 FLOP/s per chip, name) for a known accelerator, else None."""
  if device_kind in TPU_PEAKS:
    return TPU_PEAKS[device_kind]
  for key, flops, name in GPU_PEAKS:
    if key in device_kind:
      return flops, name
  return None


def measured_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
  """FLOP/s of the fastest of `repeats` n×n @ n×n matmuls compiled by XLA (2n³ each)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def device_peak(dtype: str = "float32", cpu_matmul: int = 2048) -> tuple[float | None, str]:
  """(peak FLOP/s of the devices jax sees, where it comes from); None for an unknown
  accelerator. On CPU the best of a few cpu_matmul² matmuls in `dtype`."""
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  if device.platform == "cpu":
    return (measured_matmul_peak(n=cpu_matmul, dtype=dtype),
            f"measured: best {dtype} {cpu_matmul}x{cpu_matmul} matmul in XLA on this machine")
  known = table_peak(device.device_kind)
  if known is None:
    return None, f"unknown device {device.device_kind!r}"
  return (known[0] * jax.device_count(),
          f"table: {known[1]} dense bf16 peak x {jax.device_count()} devices")


def mfu(model_flops_per_s: float, dtype: str = "float32") -> dict:
  """{"peak_flops_per_s", "peak_source", "mfu"} for the devices jax sees."""
  peak, source = device_peak(dtype)
  return {"peak_flops_per_s": peak, "peak_source": source,
          "mfu": None if peak is None else model_flops_per_s / peak}
