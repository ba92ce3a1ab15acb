"""demo_auto run after the demo in the same folder (demo._write_summary): the demo's rows
and its own times stay, the shared teacher's row stays first. The stages' results and
the pictures are stand-ins here; test_demo.py runs both configs for real."""
import json
import os
import re
import sys

import ml_collections
import pytest

from tinyclip_jax import demo
from tinyclip_jax.train import prepare, runner

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo as demo_config  # noqa: E402


def _config(auto: bool):
  return ml_collections.ConfigDict({
      "demo": {"auto": auto, "teacher_steps": 10}, "total_steps": 4,
      "masks": {"prune_step": 2, "target_sparsity": 0.5}})


def test_demo_auto_keeps_the_demos_rows_and_times(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, "final_row", lambda r: {"top1": r["top1"]})
  monkeypatch.setattr(demo.probe, "run", lambda *a, **k: {"probe": "auto"})
  monkeypatch.setattr(demo.probe, "draw_auto", lambda *a: None)
  monkeypatch.setattr(demo.prune, "structure", lambda cfg: {"kept": cfg})
  demo_rows = {"teacher": 0.8, "distilled_s0": 0.6, "scratch_s0": 0.3}
  (tmp_path / "summary.json").write_text(json.dumps({
      "rows": {k: {"top1": v} for k, v in demo_rows.items()},
      "history": {"distilled_s0": [{"step": 4}], "scratch_s0": [{"step": 4}]},
      "seconds": {"teacher": 5.0, "distilled_s0": 1.0, "scratch_s0": 1.0, "pictures": 2.0,
                  "this_run": 9.0},
      "probe": {"probe": "demo"}, "steps": 4}))
  results = {"teacher": {"top1": 0.8, "history": [], "seconds": 5.0, "config": "t"},
             "auto": {"top1": 0.7, "history": [{"step": 4}], "seconds": 3.0, "config": "a"}}
  s = demo._write_summary(_config(True), str(tmp_path), results, t0=0.0)
  assert list(s["rows"]) == ["teacher", "distilled_s0", "scratch_s0", "auto"]
  assert [s["rows"][k]["top1"] for k in s["rows"]] == [0.8, 0.6, 0.3, 0.7]
  sec = s["seconds"]
  assert (sec["pictures"], sec["this_run"], sec["teacher"], sec["auto"]) == (2.0, 9.0, 5.0, 3.0)
  assert {"auto_pictures", "auto_this_run"} <= set(sec)
  assert s["probe"] == {"probe": "demo"} and s["probe_auto"] == {"probe": "auto"}
  assert json.loads((tmp_path / "summary.json").read_text()) == s


@pytest.mark.parametrize("field,value,said,was", [
    ("teacher_steps", 10, "demo.teacher_steps", 1500),
    ("teacher_lr", 1e-3, "demo.teacher_lr", 2e-3)])
def test_a_teacher_started_with_another_demo_field_names_it(tmp_path, field, value, said, was):
  """The teacher stage's total_steps and lr come from demo.teacher_*: the refusal names
  the field the user set (it said total_steps=1500 for --config.demo.teacher_steps=10)."""
  c = demo_config.get_config()
  teacher = demo.plan(c, str(tmp_path))[0]
  (tmp_path / "0_teacher").mkdir()
  (tmp_path / "0_teacher" / "stage_config.json").write_text(
      json.dumps(runner.identity(teacher.config)))
  c.demo[field] = value
  with pytest.raises(prepare.SetupError, match=re.escape(
      f"stage 0_teacher in {tmp_path}/0_teacher was started with {said}={was!r} and this "
      f"config gives {value!r}; run the config it was started with, or give a new workdir.")):
    demo.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["0_teacher"]
  assert os.listdir(tmp_path / "0_teacher") == ["stage_config.json"]
