"""benchmarks/gpu_check.py: its dry run executes the whole path on CPU with tiny models
(JAX and PyTorch workers, each in its own process), and every line checks out against
the rules it states; without a GPU and without --dry-run it refuses in one sentence."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import jax
import pytest

from benchmarks import gpu_check, gpu_check_jax
from tinyclip_jax.models import param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not on the GPU image: the check must run without them (each stub fails on import).
ABSENT_ON_DEVICE = ("tensorflow", "tensorflow_datasets", "clu", "ftfy", "PIL")
LADDER = (64, 128, 256, 512, 1024, 2048, 4096)


def _env(tmp_path):
  blocked = tmp_path / "absent"
  for name in ABSENT_ON_DEVICE:
    (blocked / name).mkdir(parents=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not there')\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
  env["PYTHONPATH"] = os.pathsep.join([str(blocked), ROOT])
  return env


def _run(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=tmp_path,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=600)


def _flops_per_pair(cfg, passes):
  """passes (6: trained, 2: forward) × tokens × the matmul weights of the transformer
  layers, counted from the model's own parameter tree."""
  shapes = jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
  def weights(tower):
    return sum(x.size for path, x in shapes if path[0].key == tower and
               path[1].key.startswith("layers_") and path[-1].key.endswith("kernel"))
  v, t = cfg.vision, cfg.text
  return passes * (weights("visual") * ((v.image_size // v.patch_size) ** 2 + 1) +
                   weights("text") * t.context_length)


def test_dry_run_runs_every_part_and_its_summary_follows_from_its_lines(tmp_path):
  out = tmp_path / "check.jsonl"
  proc = _run(tmp_path, "--dry-run", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [json.loads(l) for l in proc.stdout.splitlines()] == lines
  kinds = [l["gpu_check"] for l in lines]
  assert kinds == ["ladder", "jax", "jax", "jax", "jax", "torch", "summary"], kinds
  assert not any(l.get("error") for l in lines), lines

  plan = gpu_check.PLANS["dry"]
  ladder, summary = lines[0], lines[-1]
  assert ladder["largest_batch"] == max(plan.ladder) and ladder["batches"] == list(plan.ladder)
  assert set(ladder["compiled_memory_mb"]) == {str(b) for b in plan.ladder}
  jax_lines = [l for l in lines if l["gpu_check"] == "jax"]
  largest = ladder["largest_batch"]
  assert sorted((l["config"], l["batch"]) for l in jax_lines) == sorted(
      [("batch", b) for b in ladder["batches"]] + [("remat", largest), ("teacher_cache", largest)])
  # run by rising compiled memory, so each rise of the process's peak is the config's own
  mems = [l["compiled_memory_mb"] for l in jax_lines]
  assert mems == sorted(mems) and all(m > 0 for m in mems)

  student, teacher = gpu_check.model_configs(plan)
  for l in jax_lines:
    assert l["remat"] == (l["config"] == "remat")
    assert l["teacher_cache"] == (l["config"] == "teacher_cache")
    assert l["steps"] == plan.steps and l["step_s"] > 0 and math.isfinite(l["loss"])
    assert l["pairs_per_s"] == pytest.approx(l["batch"] / l["step_s"], rel=1e-12)
    per_pair = _flops_per_pair(student, 6) + (
        0 if l["teacher_cache"] else _flops_per_pair(teacher, 2))
    assert l["model_flops_per_s"] == pytest.approx(per_pair * l["pairs_per_s"], rel=1e-9)
    assert l["mfu"] == pytest.approx(l["model_flops_per_s"] / l["peak_flops_per_s"], rel=1e-12)
    assert l["peak_source"].startswith("measured") and l["peak_memory_mb"] > 0
    assert l["precision"] == "bfloat16" and l["device"] == "cpu" and l["compile_s"] > 0

  (t,) = [l for l in lines if l["gpu_check"] == "torch"]
  assert t["batch"] == largest and t["steps"] == plan.steps and t["device"] == "cpu"
  assert t["pairs_per_s"] == pytest.approx(t["batch"] / t["step_s"], rel=1e-12)
  assert t["model_flops_per_s"] == pytest.approx(
      (_flops_per_pair(student, 6) + _flops_per_pair(teacher, 2)) * t["pairs_per_s"], rel=1e-9)
  assert t["mfu"] is None and t["peak_memory_mb"] > 0  # no table peak for a CPU

  best = max(jax_lines, key=lambda l: l["mfu"])
  plain = next(l for l in jax_lines if l["config"] == "batch" and l["batch"] == t["batch"])
  speedup = plain["pairs_per_s"] / t["pairs_per_s"]
  assert summary == {
      "gpu_check": "summary", "device": "cpu", "largest_batch": largest,
      "best_mfu": best["mfu"], "best_mfu_config": f"{best['config']} at batch {best['batch']}",
      "speedup_vs_torch": speedup, "speedup_batch": t["batch"],
      "goal_mfu": 0.40, "goal_speedup": 1.3, "mfu_goal_met": best["mfu"] >= 0.40,
      "speedup_goal_met": speedup >= 1.3, "results": 5, "errors": 0, "out": str(out),
      "wheels": [], "wall_s": summary["wall_s"]}
  assert 0 < summary["wall_s"] < plan.budget_s


def test_without_a_gpu_it_refuses_in_one_sentence(tmp_path):
  out = tmp_path / "check.jsonl"
  proc = _run(tmp_path, f"--out={out}")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
  assert "needs a GPU" in proc.stderr and "--dry-run" in proc.stderr
  assert not out.exists()


def test_bad_arguments_are_one_sentence(tmp_path):
  proc = _run(tmp_path, "--dry-run", f"--out={tmp_path / 'no' / 'such.jsonl'}")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert "does not exist" in proc.stderr and not (tmp_path / "no").exists()


def _affine(calls, fixed=100.0, per_pair=10.0, curve=0.0):
  def memory_mb(b):
    calls.append(b)
    return fixed + per_pair * b + curve * b * b
  return memory_mb


def test_largest_batch_follows_the_line_through_two_probes():
  calls = []  # 100 + 10 b ≤ 6000 → b ≤ 590: 512, one of the probes, so nothing more compiles
  assert gpu_check_jax.largest_batch(LADDER, _affine(calls), 6000, probe=2) == 512
  assert calls == [256, 512, 512]  # (the caller caches compiles; repeats cost nothing)
  calls = []  # b ≤ 2990: 2048, compiled to confirm
  assert gpu_check_jax.largest_batch(LADDER, _affine(calls), 30000, probe=2) == 2048
  assert calls == [256, 512, 2048]


def test_largest_batch_steps_down_when_the_compiler_disagrees_with_the_line():
  calls = []  # memory grows faster than the line through 256 and 512 (3315, 7841 MB):
  memory = _affine(calls, curve=0.01)  # it predicts 2048, which needs 62524; 1024: 20826
  assert gpu_check_jax.largest_batch(LADDER, memory, 40000, probe=2) == 1024
  assert calls == [256, 512, 2048, 1024]


def test_largest_batch_below_the_probes_and_none():
  calls = []  # the probes do not fit: b ≤ 140 by the line
  assert gpu_check_jax.largest_batch(LADDER, _affine(calls), 1500, probe=2) == 128
  assert calls == [256, 512, 128]
  calls = []  # the probes do not compile: down from the first, one rung at a time
  small = lambda b: calls.append(b) or (1.0 if b < 256 else math.inf)  # noqa: E731
  assert gpu_check_jax.largest_batch(LADDER, small, 1e9, probe=2) == 128
  assert calls == [256, 512, 256, 128]
  nothing = lambda b: math.inf  # noqa: E731
  assert gpu_check_jax.largest_batch(LADDER, nothing, 1e9, probe=2) is None


def test_batch_matrix_prefers_what_is_compiled():
  assert gpu_check_jax.batch_matrix(LADDER, 2048, [256, 512, 2048]) == [256, 512, 2048]
  assert gpu_check_jax.batch_matrix(LADDER, 512, [256, 512]) == [128, 256, 512]
  assert gpu_check_jax.batch_matrix(LADDER, 64, [64]) == [64]
  assert gpu_check_jax.batch_matrix((2, 4), 4, [2, 4]) == [2, 4]


def test_summary_counts_errors_and_needs_the_same_batch_on_both_sides():
  line = lambda side, config, batch, pairs, mfu=None, error=None: dict(  # noqa: E731
      gpu_check=side, config=config, batch=batch, pairs_per_s=pairs, mfu=mfu, error=error)
  lines = [{"gpu_check": "ladder", "device": "d", "largest_batch": 1024, "error": None},
           line("jax", "batch", 512, 100.0, 0.3), line("jax", "batch", 1024, 0, error="oom"),
           line("jax", "remat", 1024, 90.0, 0.35), line("torch", "batch", 1024, 0, error="oom"),
           line("torch", "batch", 512, 80.0)]
  s = gpu_check.summarize(lines)
  assert (s["best_mfu"], s["best_mfu_config"]) == (0.35, "remat at batch 1024")
  assert (s["speedup_vs_torch"], s["speedup_batch"]) == (100.0 / 80.0, 512)
  assert (s["mfu_goal_met"], s["speedup_goal_met"], s["results"], s["errors"]) == (
      False, False, 3, 2)
  s = gpu_check.summarize(lines[:3])
  assert s["speedup_vs_torch"] is None and s["speedup_goal_met"] is None


def test_a_worker_that_fails_or_overruns_is_one_sentence_and_its_lines_still_count():
  got = []
  script = ("import json, sys; print(json.dumps({'gpu_check': 'jax', 'batch': 2})); "
            "print('not a line'); sys.exit('boom: out of luck')")
  error = gpu_check.run_worker([sys.executable, "-c", script], dict(os.environ), 60, "jax",
                               got.append)
  assert got == [{"gpu_check": "jax", "batch": 2}]
  assert error == "the jax worker exited with code 1: boom: out of luck"
  error = gpu_check.run_worker([sys.executable, "-c", "import time; time.sleep(60)"],
                               dict(os.environ), 1, "torch", got.append)
  assert error == "the torch worker ran past 1 s and was stopped"


def test_only_wheels_with_a_missing_module_go_on_the_path(tmp_path):
  for name, files in {"has-1.0-py3-none-any.whl": ["json/__init__.py"],
                      "lacks-1.0-py3-none-any.whl": ["gpu_check_absent_mod/__init__.py",
                                                     "lacks-1.0.dist-info/METADATA"],
                      "single-1.0-py3-none-any.whl": ["gpu_check_absent_single.py"]}.items():
    with zipfile.ZipFile(tmp_path / name, "w") as z:
      for f in files:
        z.writestr(f, "")
  assert gpu_check.wheel_paths(str(tmp_path)) == [
      str(tmp_path / "lacks-1.0-py3-none-any.whl"), str(tmp_path / "single-1.0-py3-none-any.whl")]
