"""benchmarks/peak.py: which peak an MFU figure is taken against (no timing asserted)."""
from __future__ import annotations

import types

import jax
import pytest

from benchmarks import peak


@pytest.mark.parametrize("kind, flops, name", [
    ("TPU v4", 275e12, "TPU v4"),
    ("TPU v5 lite", 197e12, "TPU v5e"),
    ("TPU v5", 459e12, "TPU v5p"),
    ("TPU v5p", 459e12, "TPU v5p"),
    ("TPU v6 lite", 918e12, "TPU v6e"),
    ("NVIDIA A100-SXM4-80GB", 312e12, "A100"),
    ("NVIDIA A100 80GB PCIe", 312e12, "A100"),
    ("NVIDIA H100 80GB HBM3", 989e12, "H100 SXM"),
    ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
    ("NVIDIA H100 NVL", 835e12, "H100 NVL"),
    ("NVIDIA H200", 989e12, "H200 SXM"),
    ("NVIDIA H200 NVL", 835e12, "H200 NVL"),
])
def test_table_peaks(kind, flops, name):
  assert peak.table_peak(kind) == (flops, name)


@pytest.mark.parametrize("kind", ["TPU v4 lite", "TPU v3", "NVIDIA L4", "cpu"])
def test_unknown_devices_have_no_table_peak(kind):
  assert peak.table_peak(kind) is None


def test_cpu_mfu_is_against_a_measured_matmul(monkeypatch):
  calls = []
  monkeypatch.setattr(peak, "measured_matmul_peak",
                      lambda n, dtype: calls.append((n, dtype)) or 2e10)
  assert jax.devices()[0].platform == "cpu"
  out = peak.mfu(5e9, "float32")
  assert calls == [(2048, "float32")]
  assert out["peak_flops_per_s"] == 2e10 and out["mfu"] == 0.25
  assert out["peak_source"].startswith("measured")


def test_measured_matmul_peak_is_a_rate():
  assert peak.measured_matmul_peak(n=128, repeats=2) > 0


def test_accelerator_mfu_is_against_the_table_peak_of_all_devices(monkeypatch):
  fake = types.SimpleNamespace(platform="tpu", device_kind="TPU v4")
  monkeypatch.setattr(jax, "devices", lambda: [fake] * 8)
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  out = peak.mfu(0.5 * 8 * 275e12)
  assert out["peak_flops_per_s"] == 8 * 275e12 and out["mfu"] == 0.5
  assert out["peak_source"] == "table: TPU v4 dense bf16 peak x 8 devices"
  fake.device_kind = "TPU v4 lite"
  assert peak.mfu(1e12) == {
      "peak_flops_per_s": None,
      "peak_source": "unknown device 'TPU v4 lite'",
      "mfu": None
  }
