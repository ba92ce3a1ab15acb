"""The demo end to end at toy length: every artefact the README promises is written."""
import json
import os
import sys

import pytest

from tinyclip_jax import demo, model_io
from tinyclip_jax.train import prepare

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import demo as demo_config  # noqa: E402


def test_demo_writes_summary_plot_and_checkpoints(tmp_path):
  c = demo_config.get_config()
  c.demo.teacher_steps = 3
  c.total_steps = 4
  c.batch_size = 16
  c.log_every = c.eval_every = 2
  c.eval.num_examples = 32
  c.eval.batch_size = 32
  c.teacher.custom.update(vision_width=64, text_width=64)
  c.student.custom.update(vision_width=32, text_width=32)
  summary = demo.run(c, str(tmp_path))

  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["steps"] == 4
  for name in ("teacher", "distilled", "scratch"):
    assert set(on_disk[name]) >= {"top1", "top5", "params"}
    params, config = model_io.load_model(on_disk[name]["checkpoint"])
    assert on_disk[name]["params"] == sum(x.size for x in __import__("jax").tree.leaves(params))
  assert on_disk["distilled"]["params"] == on_disk["scratch"]["params"] < on_disk["teacher"]["params"]
  assert [h["step"] for h in on_disk["history"]["distilled"]] == [2, 4]
  assert [h["step"] for h in on_disk["history"]["scratch"]] == [2, 4]
  assert "distilled_reached_scratch_at" in on_disk
  assert (tmp_path / "top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert summary["distilled_reached_scratch_at"] == demo.reached_at(
      summary["history"]["distilled"], summary["scratch"]["top1"])


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
