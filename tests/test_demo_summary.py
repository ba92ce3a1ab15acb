"""demo_auto run after the demo in the same folder (demo._write_summary): the demo's rows
and its own times stay, the shared teacher's row stays first. The stages' results and
the pictures are stand-ins here; test_demo.py runs both configs for real."""
import json

import ml_collections

from tinyclip_jax import demo


def _config(auto: bool):
  return ml_collections.ConfigDict({
      "demo": {"auto": auto, "teacher_steps": 10}, "total_steps": 4,
      "masks": {"prune_step": 2, "target_sparsity": 0.5}})


def test_demo_auto_keeps_the_demos_rows_and_times(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, "_final", lambda r: {"top1": r["top1"]})
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
