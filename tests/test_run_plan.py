"""The run plan: phases made before anything runs, and every path through it resumed
after a SIGKILL in each of its phases (the deterministic fault hook, tinyclip_jax/faults.py),
and a SIGTERM turned into a checkpoint and exit 0."""
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from tinyclip_jax.train import plan as plan_lib, prepare, runner
from tinyclip_jax import workdir as workdir_lib, demo, status

sys.path.insert(0, os.path.dirname(__file__))
from test_auto_inherit import SMALL, auto_config  # noqa: E402
from test_demo import check_demo_artefacts, check_probe  # noqa: E402
from test_train import ROOT, smoke_config  # noqa: E402

sys.path.insert(0, ROOT)
from configs import demo as demo_config  # noqa: E402

# Keys whose values depend on time, not on the computation.
TIMING = ("pairs_per_s", "model_flops_per_s", "steps_per_sec", "uptime")


def test_plan_of_each_kind_of_run():
  manual = plan_lib.plan(smoke_config(), "/w")
  assert [(p.name, p.start, p.masks, p.first_step, p.last_step, p.export, p.workdir)
          for p in manual] == [("train", "inherit", False, 0, 6, True, "/w")]
  auto = plan_lib.plan(auto_config(), "/w")
  assert [(p.name, p.start, p.masks, p.first_step, p.last_step, p.export) for p in auto] == [
      ("masked", "inherit", True, 0, 3, False), ("pruned", "prune", False, 3, 6, True)]
  c = auto_config()
  c.stages = (ml_collections.ConfigDict({"name": "auto"}),
              ml_collections.ConfigDict({"name": "manual", "total_steps": 2,
                                         "masks": {"enabled": False},
                                         "student": {"init": "inherit", "custom": SMALL}}))
  staged = plan_lib.plan(c, "/w/")
  assert [(p.name, p.start, p.first_step, p.last_step, p.workdir) for p in staged] == [
      ("0_auto/masked", "inherit", 0, 3, "/w/0_auto"),
      ("0_auto/pruned", "prune", 3, 6, "/w/0_auto"),
      ("1_manual/train", "inherit", 0, 2, "/w/1_manual")]
  assert staged[2].config.student.inherit_from == "/w/0_auto/final"  # cut from stage 0
  d = demo.plan(demo_config.get_config(), "/d")
  assert [(p.name, p.start) for p in d][:3] == [
      ("0_teacher/train", "scratch"), ("1_distilled_s0/train", "inherit"),
      ("2_scratch_s0/train", "scratch")]
  teacher, distilled, scratch = (p.config for p in d[:3])
  assert teacher.loss.alpha == 0 and not teacher.teacher.checkpoint
  assert distilled.teacher.checkpoint == "/d/0_teacher/final" and distilled.loss.alpha == 1
  assert scratch.loss.alpha == 0 and not scratch.teacher.checkpoint
  assert (distilled.student.custom.to_dict() == scratch.student.custom.to_dict() !=
          teacher.student.custom.to_dict())


def test_teacher_from_a_later_stage_is_refused():
  c = smoke_config()
  c.stages = ({"name": "a", "teacher_from_stage": 0},)
  with pytest.raises(prepare.SetupError, match=r"takes its teacher from stage 0, which does"):
    plan_lib.plan(c, "/w")


def _run(args, fault: str, expect: int, cache):
  # One device: the smallest compile; the attempts share a compilation cache, so a
  # restart loads the programs the attempt before it compiled instead of compiling again.
  env = dict(os.environ, TINYCLIP_FAULT=fault, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "tinyclip_jax.main", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == expect, (fault, r.stderr[-3000:])
  return r


def _rows(workdir: str) -> dict:
  """{(stage folder, step): logged row without timing keys} of every stage's metrics."""
  out = {}
  for root, _, files in os.walk(workdir):
    if "metrics.jsonl" in files:
      with open(os.path.join(root, "metrics.jsonl")) as f:
        for line in f:
          row = json.loads(line)
          out[(os.path.relpath(root, workdir), row["step"])] = {
              k: v for k, v in row.items() if k not in TIMING}
  return out


def _check_replayed(before: dict, after: dict) -> int:
  """Rows logged before a kill are logged again after the restart with the same values."""
  same = 0
  for key, row in before.items():
    assert key in after, key
    for k, v in row.items():
      if isinstance(v, float) and k in after[key]:
        assert after[key][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (key, k)
    same += 1
  return same


def _kill_and_resume(args, workdir, faults, final_steps, on_kill=None):
  """Runs `args` once per fault (each kills or preempts the run somewhere) and once to the
  end; every restart replays what the previous attempt logged, value for value."""
  before, cache = {}, os.path.join(os.path.dirname(workdir), "jax_cache")
  for k, fault in enumerate(faults):
    _run(args, fault, 0 if fault.startswith("term") else -9, cache)
    now = _rows(workdir)
    _check_replayed(before, now)
    before = now
    if on_kill is not None:
      on_kill(k)
  _run(args, "", 0, cache)
  after = _rows(workdir)
  assert _check_replayed(before, after) == len(before)
  for stage, steps in final_steps.items():
    assert sorted(s for (d, s) in after if d == stage) == steps, stage
  return after


@pytest.mark.xdist_group("plan_kill")
def test_stages_resume_after_a_kill_in_every_phase(tmp_path):
  """Stage 0: automatic inheritance (masked → pruned at 3 of 6), stage 1: manual cut.
  Killed in the masked phase (after its step-2 checkpoint), in the pruned phase (after
  step 4's), preempted (SIGTERM) in stage 1, then run to the end."""
  config = tmp_path / "staged.py"
  config.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(ROOT)!r})
      from configs import smoke
      SMALL = {SMALL!r}
      TEACHER = dict(SMALL, vision_width=64, vision_layers=2, text_width=64, text_layers=2)

      def get_config():
        c = smoke.get_config()
        c.eval.tasks, c.total_steps, c.checkpoint_every, c.log_every = "", 6, 2, 1
        c.teacher.custom.update(TEACHER)
        c.student.custom.update(TEACHER)
        c.masks.enabled = True
        c.masks.update(dict(start_sparsity=0.0, target_sparsity=0.4, sparsity_warmup=2,
                            prune_step=3, lr=0.5))
        c.stages = ({{"name": "auto"}},
                    {{"name": "manual", "total_steps": 2, "masks": {{"enabled": False}},
                      "student": {{"init": "inherit", "custom": SMALL}}}})
        return c
  """))
  workdir = tmp_path / "run"
  args = [f"--config={config}", f"--workdir={workdir}"]
  spec = importlib.util.spec_from_file_location("staged_config", config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  expected = [  # `python -m tinyclip_jax.status` after each attempt
      ["resumes from step 2", "not started", "not started"],
      ["done", "resumes from step 4", "not started"],
      ["done", "done", "resumes from step 1"]]
  seen = []

  def status_after(k):
    seen.append([state for _, state in status.phases_status(module.get_config(), str(workdir))])
    assert seen[-1] == expected[k], (k, seen)
  _kill_and_resume(args, str(workdir),
                   ["kill_at_step:3@masked", "kill_at_step:5@pruned", "term_at_step:1@1_manual"],
                   {"0_auto": [1, 2, 3, 4, 5, 6], "1_manual": [1, 2]}, status_after)
  assert [s for _, s in status.phases_status(module.get_config(), str(workdir))] == ["done"] * 3
  for stage in ("0_auto", "1_manual"):
    assert (workdir / stage / "stage_done.json").exists()
    assert (workdir / stage / "final").is_dir()
  # The SIGTERM saved stage 1's step 1 (its checkpoints are every 2 steps).
  assert (workdir / "1_manual" / "checkpoints" / "1").is_dir()


@pytest.mark.xdist_group("plan_kill_demo")
def test_demo_resumes_after_a_kill(tmp_path):
  """Killed in the first distilled stage, whose teacher the first attempt held in memory
  from the teacher stage: the restart reads it back from the teacher's export. (Each
  stage is one phase of the same kind the staged test kills; one kill keeps the suite
  short.) Two seeds and the ablation row; the long scratch row is the same stage kind."""
  workdir = tmp_path / "demo"
  args = ["--config=configs/demo.py", f"--workdir={workdir}", "--config.demo.teacher_steps=4",
          "--config.demo.teacher_eval_every=2", "--config.demo.seeds=2",
          "--config.demo.scratch_long=False", "--config.demo.grid=4",
          "--config.demo.affinity=3",
          "--config.total_steps=4", "--config.batch_size=16", "--config.log_every=1",
          "--config.eval_every=2", "--config.checkpoint_every=2",
          "--config.eval.num_examples=32", "--config.eval.batch_size=32",
          "--config.teacher.custom.vision_width=64", "--config.teacher.custom.text_width=64",
          "--config.teacher.custom.vision_layers=2", "--config.teacher.custom.text_layers=2",
          "--config.student.custom.vision_width=32", "--config.student.custom.text_width=32",
          "--config.student.custom.vision_layers=1", "--config.student.custom.text_layers=1"]
  stages = ("teacher", "distilled_s0", "scratch_s0", "distilled_s1", "scratch_s1",
            "inherit_clip_s0")
  _kill_and_resume(args, str(workdir), ["kill_at_step:3@distilled_s0"],
                   {f"{k}_{n}": [1, 2, 3, 4] for k, n in enumerate(stages)})
  check_demo_artefacts(workdir, 4, seeds=2, ablation=True)
  # (A changed config in this folder is refused: test_a_stage_folder_started_with_another_
  # config_is_refused and tests/test_demo_summary.py, without a process of their own.)
  cache = tmp_path / "jax_cache"
  # demo_auto in the same folder: the finished teacher stage is taken as it is, the
  # auto student's guesses are recomputed in torch, the students' rows stay.
  auto = [a.replace("configs/demo.py", "configs/demo_auto.py") for a in args
          if not a.startswith("--config.student.")]
  r = _run([*auto, "--config.masks.sparsity_warmup=1", "--config.masks.prune_step=2"], "", 0,
           cache)
  assert "stage 0_teacher is complete" in r.stderr
  s = json.loads((workdir / "summary.json").read_text())
  assert {"distilled_s0", "scratch_s1", "auto"} <= set(s["rows"])
  assert s["auto"]["prune_step"] == 2 and s["rows"]["auto"]["step"] == 4
  check_probe(s["probe_auto"], {k: r["checkpoint"] for k, r in s["rows"].items()},
              affinity=False)
  assert (workdir / "auto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # demo_cache in the same folder: the training set as shards, one per-sample cache of
  # the finished teacher, the manual and auto students distilled from it.
  cached = [a.replace("configs/demo.py", "configs/demo_cache.py") for a in args]
  r = _run([*cached, "--config.demo.cache.samples=96", "--config.demo.cache.shards=2",
            "--config.demo.cache.augmentations=2", "--config.demo.cache.auto_steps=4",
            "--config.demo.cache.auto_prune_step=2", "--config.demo.cache.online=False"], "",
           0, cache)
  assert "stage 0_teacher is complete" in r.stderr
  check_cached_demo(workdir / "cache", samples=96, k=2, auto_steps=4)


def check_cached_demo(root, samples: int, k: int, auto_steps: int) -> None:
  """DIR/cache/summary.json against the cache's manifest and each stage's own files."""
  summary = json.loads((root / "summary.json").read_text())
  assert sorted(summary["rows"]) == ["auto_cached", "manual_cached"]
  manifest = json.loads((root / f"teacher_k{k}" / "cache.json").read_text())
  assert manifest["augment"]["augmentations"] == k
  assert sum(v["cached"] for v in manifest["shards"].values()) == samples
  seconds = 0.0
  for i, name in enumerate(("manual_cached", "auto_cached")):
    stage = root / f"{i}_{name}"
    done = json.loads((stage / workdir_lib.STAGE_DONE).read_text())
    last = max((json.loads(p.read_text()) for p in (stage / "evals").glob("step_*.json")),
               key=lambda e: e["step"])
    row = summary["rows"][name]
    assert row["top1"] == last["top1"] and row["step"] == done["step"] == last["step"]
    assert row["seconds"] == done["seconds"]
    seconds += done["seconds"]
    identity = json.loads((stage / "stage_config.json").read_text())
    assert identity["teacher"]["cache"] == str(root / f"teacher_k{k}")
    assert identity["data"]["augmentations"] == k
  assert summary["rows"]["auto_cached"]["step"] == auto_steps
  assert summary["seconds"]["cache_build"] == round(manifest["build"]["seconds"], 1)
  assert summary["seconds"]["students_cached"] == seconds


def test_bad_run_input_is_one_sentence_before_anything_runs(tmp_path):
  (tmp_path / "afile").write_text("")
  with pytest.raises(prepare.SetupError, match=r"the workdir .*afile is a file; give a folder"):
    runner.run(smoke_config(), str(tmp_path / "afile"))
  with pytest.raises(prepare.SetupError, match=r"folder /nonexistent does not exist"):
    runner.run(smoke_config({"eval.tasks": "folder:/nonexistent"}), str(tmp_path / "w"))
  c = smoke_config()
  c.stages = ({"name": "a"}, {"name": "b", "student": {"custom": {"vision_width": 16}}})
  with pytest.raises(prepare.SetupError, match=r"stages\[1\] \(b\) sets student.custom but "
                                               r"continues stage 0's student as it is"):
    runner.run(c, str(tmp_path / "w"))
  c.stages = ({"name": "a", "from_stage": 0},)
  with pytest.raises(prepare.SetupError, match=r"to -1 \(the first stage starts as the base"):
    runner.run(c, str(tmp_path / "w"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


@pytest.mark.parametrize("under", ["", "x/y"])
def test_a_workdir_at_or_under_a_file_is_one_sentence(tmp_path, under):
  """The demo's stages live in subfolders of the workdir: a workdir that is a file, or
  lies under one, is refused by the plan (it was a NotADirectoryError traceback after
  the first stage's setup)."""
  (tmp_path / "afile").write_text("")
  workdir = os.path.join(tmp_path, "afile", under) if under else str(tmp_path / "afile")
  said = (rf"the workdir {workdir} is a file; give a folder" if not under else
          rf"the workdir {workdir} lies under {tmp_path}/afile, which is a file; give a folder")
  for run in (lambda: runner.run(smoke_config(), workdir),
              lambda: demo.run(demo_config.get_config(), workdir)):
    with pytest.raises(prepare.SetupError, match=said):
      run()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
  assert (tmp_path / "afile").read_text() == ""


@pytest.mark.parametrize("field,value,said", [
    ("backgrounds", ("black", "plaid"), "data.backgrounds ('black', 'plaid') must be a non-empty "
     "subset of ('black', 'white', 'grey', 'striped', 'noisy', 'gradient', 'checkered')"),
    ("captions", "bogus", "data.captions must be 'full' or 'objects', got 'bogus'"),
    ("object_scale", 5.0, "data.object_scale must be in [0.5, 2], got 5.0"),
    ("max_objects", 0, "data.max_objects must be in [1, 4], got 0")])
def test_bad_generator_fields_are_refused_before_the_demo_runs(tmp_path, field, value, said):
  """The generator's fields were checked only when the first stage built its input (a
  ValueError traceback, exit 1, after the workdir was made)."""
  c = demo_config.get_config()
  c.data[field] = value
  with pytest.raises(prepare.SetupError, match=re.escape(said + "; fix it in the config.") + "$"):
    demo.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_stage_folder_started_with_another_config_is_refused(tmp_path):
  """What a stage trains is its identity (stage_config.json); a restart with another
  is one sentence naming the field, before anything runs. Logging, evaluation,
  checkpoint cadence, the mesh and unused mask settings may change."""
  c = smoke_config()
  c.stages = ({"name": "a"},)
  (phase,) = plan_lib.plan(c, str(tmp_path))
  free = copy.deepcopy(phase.config)
  free.log_every, free.eval.num_examples, free.mesh.data = 7, 3, 2
  free.masks.target_sparsity = 0.3  # masks are off in this stage
  assert runner.identity(free) == runner.identity(phase.config)
  (tmp_path / "0_a").mkdir()
  (tmp_path / "0_a" / "stage_config.json").write_text(json.dumps(runner.identity(phase.config)))
  c.optimizer.lr = phase.config.optimizer.lr * 2
  with pytest.raises(prepare.SetupError, match=rf"stage 0_a in {tmp_path}/0_a was started with "
                     rf"optimizer.lr={phase.config.optimizer.lr!r} and this config gives"):
    runner.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "0_a")) == ["stage_config.json"]
