"""Automatic weight inheritance in training runs: the masked phase, the prune step,
resume on either side of it, progressive stages, and their config errors.

Tiny models on one device, no evaluation (the eval path is covered elsewhere); the
runs are module fixtures shared by the tests.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from tinyclip_jax import model_io
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.models import CLIPConfig, count_params, param_shapes
from tinyclip_jax.train import plan as plan_lib, prepare, runner
from test_train import ROOT, mesh_on, smoke_config

# The resumed run initialises the staged run's teacher again: the module's compilation
# cache (tests/compile_cache.py) loads it.
pytestmark = [pytest.mark.xdist_group("auto"), pytest.mark.usefixtures("compile_cache")]

TEACHER = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
               text_width=64, text_layers=2, text_heads=0, head_dim=32, context_length=32,
               vocab_size=49408, activation="gelu")
SMALL = dict(TEACHER, vision_width=32, vision_layers=1, text_width=32, text_layers=1)


def auto_config(**masks):
  c = smoke_config({"eval.tasks": "", "total_steps": 6, "checkpoint_every": 2, "log_every": 1})
  c.teacher.custom.update(TEACHER)
  c.student.custom.update(TEACHER)        # a copy of the teacher, then masked
  c.masks.enabled = True
  c.masks.kinds = ("hidden", "heads", "intermediate", "layer")
  c.masks.update(dict(start_sparsity=0.0, target_sparsity=0.4, sparsity_warmup=2, prune_step=3,
                      lr=0.5, **masks))  # a large mask lr so a few steps move the gates
  return c


def staged_config():
  """Stage "auto" (masks, prune at 3 of 6) then stage "manual" (cut SMALL out of it)."""
  c = auto_config()
  c.stages = (
      ml_collections.ConfigDict({"name": "auto"}),
      ml_collections.ConfigDict({"name": "manual", "total_steps": 2, "masks": {"enabled": False},
                                 "student": {"init": "inherit", "custom": SMALL}}),
  )
  return c


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
  """One two-stage run, shared: its first stage is the masked → pruned run."""
  workdir = str(tmp_path_factory.mktemp("staged"))
  with pytest.MonkeyPatch.context() as mp:
    import jax  # pylint: disable=import-outside-toplevel
    mesh_on(mp, jax.devices()[:1])
    result = runner.run(staged_config(), workdir)
  return workdir, result


def test_masked_phase_logs_sparsity_and_then_prunes(staged):
  workdir = staged[0] + "/0_auto"
  rows = {r["step"]: r for r in read_jsonl(f"{workdir}/metrics.jsonl")}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  for s in (1, 2, 3):  # masked steps carry the sparsity terms
    for key in ("visual/expected_sparsity", "text/expected_sparsity", "target_sparsity",
                "visual/lambda_1", "lagrangian", "distill_loss"):
      assert key in rows[s], (s, key)
    assert rows[s]["loss"] == pytest.approx(rows[s]["distill_loss"] + rows[s]["lagrangian"])
  assert rows[1]["target_sparsity"] == pytest.approx(0.0)
  assert rows[3]["target_sparsity"] == pytest.approx(0.4)
  assert rows[3]["visual/lambda_1"] > rows[2]["visual/lambda_1"]  # below target: λ ascends
  for s in (4, 5, 6):  # after the prune step: no masks
    assert "lagrangian" not in rows[s]
  # The learning rate warms up over the masked phase and decays from the prune step on.
  assert rows[1]["learning_rate"] < rows[3]["learning_rate"]
  assert rows[4]["learning_rate"] > rows[6]["learning_rate"]


def test_pruned_student_is_the_structure_written_at_the_prune_step(staged):
  workdir, result = staged[0] + "/0_auto", staged[1]["stages"][0]
  kept = json.load(open(f"{workdir}/structure/pruned_00000003.json"))
  cfg = CLIPConfig.from_dict(result["student_config"])
  for tower, field in (("visual", "vision"), ("text", "text")):
    t = getattr(cfg, field)
    k = kept["kept"][tower]
    assert t.width == k["width"]
    assert list(t.heads) == [h for h, m in zip(k["heads"], k["mlp"]) if h or m]
    assert list(t.mlp) == [m for h, m in zip(k["heads"], k["mlp"]) if h or m]
  assert os.path.exists(f"{workdir}/structure/pruned_00000003.png")
  full = count_params(param_shapes(cfg))
  params, saved = model_io.load_model(f"{workdir}/final")  # the export is the pruned model
  assert saved == cfg and kept["params"] == full == count_params(params)
  teacher = prepare.build(auto_config(), restoring=True)[0].teacher_config
  assert count_params(params) < count_params(param_shapes(teacher))


def test_stages_chain_and_a_restart_skips_finished_stages(staged):
  workdir, result = staged
  first, second = result["stages"]
  assert first["workdir"].endswith("0_auto") and second["workdir"].endswith("1_manual")
  # Stage 2 was cut (manually) from stage 1's pruned student: exactly the configured size.
  small = prepare.build(_manual(SMALL), restoring=True)[0].student_config
  assert CLIPConfig.from_dict(second["student_config"]) == small
  params, _ = model_io.load_model(f"{workdir}/1_manual/final")
  assert count_params(params) == count_params(param_shapes(small))
  again = runner.run(staged_config(), workdir)  # both stages are done: nothing runs
  assert [s["name"] for s in again["stages"]] == ["auto", "manual"]
  assert "params" not in again


def test_resume_after_the_prune_step_rebuilds_the_pruned_student(staged, tmp_path):
  src = staged[0] + "/0_auto"
  resumed = tmp_path / "resumed"
  shutil.copytree(src, resumed)
  shutil.rmtree(resumed / "final")
  (resumed / runner.DONE).unlink()
  c = auto_config()
  c.total_steps = 8
  with pytest.MonkeyPatch.context() as mp:
    import jax  # pylint: disable=import-outside-toplevel
    mesh_on(mp, jax.devices()[:1])
    r = runner.run(c, str(resumed))
  assert r["student_config"].to_dict() == staged[1]["stages"][0]["student_config"]
  steps = [row["step"] for row in read_jsonl(f"{resumed}/metrics.jsonl")]
  assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def _manual(custom):
  c = smoke_config({"eval.tasks": ""})
  c.student.custom.update(custom)
  return c


@pytest.mark.parametrize("overrides, message", [
    ({"masks.target_sparsity": 0.1, "masks.start_sparsity": 0.2}, "is below masks.start_sparsity"),
    ({"masks.prune_step": 1, "masks.sparsity_warmup": 2}, "comes before masks.sparsity_warmup"),
    ({"masks.towers": ("visual", "audio")}, "names a tower the model lacks"),
    ({"masks.kinds": ("heads", "rows")}, "masks.kinds"),
    ({"masks.prune_step": 60}, "must be in [1, total_steps=6]"),
])
def test_bad_mask_configs_fail_before_compiling(overrides, message):
  c = auto_config()
  for k, v in overrides.items():
    group, field = k.split(".")
    c[group][field] = v
  with pytest.raises(prepare.SetupError, match=re_escape(message)):
    prepare.validate(c)


def re_escape(text):
  return re.escape(text)


@pytest.mark.parametrize("stage_list, message", [
    (({"name": "a"}, {"name": "b", "from_stage": 1}), "starts from stage 1, which does not come"),
    (({"name": "a"}, {"name": "b", "from_stage": 3}), "starts from stage 3"),
    (({"name": "a", "masks": {"target": 0.5}},), "stages[0].masks.target names no field"),
    (({"name": "a"}, {"name": "a"}), "repeat"),
])
def test_bad_stages_fail_before_anything_runs(stage_list, message, tmp_path):
  c = auto_config()
  c.stages = tuple(ml_collections.ConfigDict(s) for s in stage_list)
  with pytest.raises(prepare.SetupError, match=re_escape(message)):
    runner.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_cli_bad_sparsity_exits_2_with_one_sentence(tmp_path):
  workdir = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "tinyclip_jax.main",
                      f"--config={ROOT / 'configs' / 'demo_auto.py'}", f"--workdir={workdir}",
                      "--config.masks.target_sparsity=0.1", "--config.masks.start_sparsity=0.3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "below masks.start_sparsity" in errors[0]
  assert not workdir.exists() or not any(workdir.iterdir())


def test_stage_overrides_do_not_leak_between_stages():
  c = auto_config()
  c.stages = (ml_collections.ConfigDict({"name": "a", "masks": {"target_sparsity": 0.6}}),
              ml_collections.ConfigDict({"name": "b"}))
  (_, a, _), (_, b, _) = plan_lib.stages(copy.deepcopy(c), "/tmp/none")
  assert a.masks.target_sparsity == 0.6 and b.masks.target_sparsity == 0.4
  assert np.isclose(c.masks.target_sparsity, 0.4)
