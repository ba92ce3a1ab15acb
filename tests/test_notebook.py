"""launch/colab_tpu_demo.ipynb runs top to bottom on CPU (TINYCLIP_NOTEBOOK_TINY=1:
tiny models, a few steps) in a real Jupyter kernel, so the notebook cannot rot."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu_demo.ipynb"


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  # The kernel inherits this environment: this checkout's package, one CPU device.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TINYCLIP_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("TINYCLIP_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb,
      timeout=300,
      kernel_name="python3",
      resources={"metadata": {
          "path": str(ROOT / "launch")
      }})
  client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  assert f"tinyclip_jax from {ROOT / 'tinyclip_jax'}" in text  # not another install
  assert "CpuDevice" in text

  # Both top-5 plots were shown in the notebook and saved.
  plots = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
  assert len(plots) == 2, [c.source[:60] for c in plots]
  assert (tmp_path / "top5_teacher.png").stat().st_size > 0
  assert (tmp_path / "top5_final.png").stat().st_size > 0

  # The teacher went through the converter; the distillation ran its steps and exported.
  assert (tmp_path / "teacher.safetensors").is_file() and (tmp_path / "teacher").is_dir()
  rows = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").open()]
  assert rows[-1]["step"] == 6 and "eval/top1" in rows[-1]
  assert (tmp_path / "distill" / "final").is_dir()
