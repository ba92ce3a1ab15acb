"""The demo: every artefact the README promises (checked on the run in
tests/test_run_plan.py), and its bad input."""
import json
import os
import sys

import pytest

from tinyclip_jax import demo, model_io
from tinyclip_jax.train import prepare

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import demo as demo_config  # noqa: E402


def check_demo_artefacts(workdir, steps: int) -> None:
  """Every artefact the README promises, in a finished demo's folder (the demo runs in
  tests/test_run_plan.py, killed once and resumed: one run for both)."""
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk["steps"] == steps
  for name in ("teacher", "distilled", "scratch"):
    assert set(on_disk[name]) >= {"top1", "top5", "params"}
    params, _ = model_io.load_model(on_disk[name]["checkpoint"])
    assert on_disk[name]["params"] == sum(x.size for x in __import__("jax").tree.leaves(params))
  assert on_disk["distilled"]["params"] == on_disk["scratch"]["params"] < on_disk["teacher"]["params"]
  evals = list(range(2, steps + 1, 2))
  assert [h["step"] for h in on_disk["history"]["distilled"]] == evals
  assert [h["step"] for h in on_disk["history"]["scratch"]] == evals
  assert on_disk["distilled_reached_scratch_at"] == demo.reached_at(
      on_disk["history"]["distilled"], on_disk["scratch"]["top1"])
  assert (workdir / "top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reached_at():
  hist = [{"step": 10, "top1": 0.1}, {"step": 20, "top1": 0.3}, {"step": 30, "top1": 0.2}]
  assert demo.reached_at(hist, 0.25) == 20
  assert demo.reached_at(hist, 0.1) == 10
  assert demo.reached_at(hist, 0.5) is None


def test_demo_needs_the_synthetic_task(tmp_path):
  c = demo_config.get_config()
  c.eval.tasks = "cifar10"
  with pytest.raises(prepare.SetupError, match="eval.tasks 'cifar10': .* keep 'synthetic' in it"):
    demo.run(c, str(tmp_path / "demo"))
  assert not (tmp_path / "demo").exists()
