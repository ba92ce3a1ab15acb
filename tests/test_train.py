"""Training end to end on CPU: the smoke run, sharded == single device, the compiled
step's collectives, resume after SIGKILL, bad input and non-finite losses.

One in-process run on 8 devices (data=4 × fsdp=2) is shared by the end-to-end and
HLO tests; the CLI and resume tests share three `python -m tinyclip_jax.main`
subprocesses on one device.
"""
from __future__ import annotations

import collections
import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from tinyclip_jax import checkpoint, main as main_lib, metrics as metrics_lib, model_io, parallel
from tinyclip_jax.data import pipeline
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.train import compile as compile_lib, defaults, loop, prepare, runner

# The module fixtures are shared runs: keep this file on one xdist worker
# (effective with `pytest -n 2 --dist loadgroup`; plain `-n` would run them once per worker).
pytestmark = pytest.mark.xdist_group("train")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.py"
BATCH, EMBED = 16, 32  # the smoke config's global batch and embedding width


def smoke_config(overrides: dict | None = None):
  spec = importlib.util.spec_from_file_location("smoke_config", SMOKE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.update_from_flattened_dict(overrides or {})
  return config


def mesh_on(mp: pytest.MonkeyPatch, devices) -> None:
  """Makes the run build its mesh over `devices` instead of all of jax.devices()."""
  make_mesh = parallel.make_mesh
  mp.setattr(parallel, "make_mesh", lambda sizes, _=None: make_mesh(sizes, devices))


def losses_by_step(rows):
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """The smoke config as is, on 8 devices as data=4 × fsdp=2. Keeps the HLO text of the
  train step the loop compiled, and saves the (random) teacher it built so the other
  runs can load the same teacher instead of compiling its initialization again."""
  assert jax.device_count() == 8
  workdir = tmp_path_factory.mktemp("sharded")
  hlo, setups = [], []
  log_compiled, setup_fn = compile_lib.log_compiled, prepare.setup
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(compile_lib, "log_compiled",
               lambda c, what: (hlo.append(c.as_text()), log_compiled(c, what)))
    mp.setattr(prepare, "setup", lambda *a, **k: setups.append(setup_fn(*a, **k)) or setups[-1])
    # Steps 2–3 are profiled: that costs the run no compile and tests the profile window.
    result = runner.run(smoke_config({"mesh.data": 4, "mesh.fsdp": 2, "profile.start_step": 2,
                                    "profile.num_steps": 2}), str(workdir))
  assert len(hlo) == len(setups) == 1
  setup = setups[0]
  teacher_dir = tmp_path_factory.mktemp("teacher") / "model"
  model_io.save_model(str(teacher_dir), prepare.as_numpy(setup.teacher_params),
                      setup.teacher_config)
  return types.SimpleNamespace(workdir=workdir, result=result, hlo=hlo[0], teacher=teacher_dir,
                               rows=read_jsonl(workdir / "metrics.jsonl"))


def fast_config(sharded, overrides=None):
  """The smoke config with the sharded run's teacher loaded, no eval, every step logged
  and max_nonfinite=2 (which changes nothing while losses are finite)."""
  return smoke_config({"teacher.checkpoint": str(sharded.teacher), "eval.tasks": "",
                       "log_every": 1, "checkpoint_every": 100, "max_nonfinite": 2,
                       **(overrides or {})})


@pytest.fixture(scope="module")
def single(tmp_path_factory, sharded, compile_cache):
  """The same run on one device. (The non-finite test compiles its step again: the
  module's compilation cache, tests/compile_cache.py, loads it.)"""
  workdir = tmp_path_factory.mktemp("single")
  with pytest.MonkeyPatch.context() as mp:
    mesh_on(mp, jax.devices()[:1])
    runner.run(fast_config(sharded), str(workdir))
  return read_jsonl(workdir / "metrics.jsonl")


# --- 1. end to end ----------------------------------------------------------------

def test_smoke_run_writes_metrics_events_checkpoints_and_export(sharded):
  config = smoke_config()
  rows = sharded.rows
  expected_steps = sorted({s for s in range(1, config.total_steps + 1)
                           if s % config.log_every == 0 or s % config.eval_every == 0}
                          | {config.total_steps})
  assert [r["step"] for r in rows] == expected_steps == [2, 3, 4, 6]
  for r in rows:
    for k in ("loss", "total", "affinity", "affinity_i2t", "affinity_t2i", "grad_norm",
              "learning_rate", "student_scale", "teacher_scale", "pairs_per_s",
              "model_flops_per_s", "nonfinite_total", "nonfinite_in_a_row"):
      assert np.isfinite(r[k]), (r["step"], k)
    assert r["loss"] == r["total"] == pytest.approx(r["affinity"])
    assert r["student_scale"] == r["teacher_scale"] == 50.0
    assert r["pairs_per_s"] > 0 and r["nonfinite_total"] == 0
    is_eval = r["step"] % config.eval_every == 0 or r["step"] == config.total_steps
    assert ("eval/top1" in r) == ("eval/top5" in r) == is_eval, r
    if is_eval:
      assert 0 <= r["eval/top1"] <= r["eval/top5"] <= 1
  lr = {r["step"]: r["learning_rate"] for r in rows}  # lr of the step's update (step-1)
  assert lr[3] == pytest.approx(config.optimizer.lr) and lr[6] < lr[4] < lr[3]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert [e["step"] for e in sharded.result["evals"]] == [3, 6]

  assert list(sharded.workdir.glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (sharded.workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [3, 6]
  params, cfg = model_io.load_model(str(sharded.workdir / "final"))
  assert cfg == sharded.result["student_config"] == defaults.build_model_config(
      config.student, "student")
  trained = prepare.as_numpy(sharded.result["params"])
  assert jax.tree.structure(params) == jax.tree.structure(trained)
  jax.tree.map(np.testing.assert_array_equal, params, trained)


def test_profile_window_traces_exactly_its_steps(sharded):
  """profile.start_step=2, num_steps=2: one trace holding two executions of the train
  step on each of the 8 devices (steps 2 and 3, finished before the trace stopped)."""
  runs = [p for p in (sharded.workdir / "profile" / "plugins" / "profile").iterdir()]
  assert len(runs) == 1, runs
  assert (list(runs[0].glob("*.xplane.pb")) and
          all(p.stat().st_size > 0 for p in runs[0].glob("*.xplane.pb")))
  [trace] = runs[0].glob("*.trace.json.gz")
  names = collections.Counter(e.get("name") for e in json.loads(gzip.open(trace).read())
                              ["traceEvents"])
  assert names["CommonPjRtLoadedExecutable::Execute (jit_step)"] == 2, names.most_common(40)
  for d in range(8):
    assert names[f"[{d}] CommonPjRtLoadedExecutable::Execute (jit_step)"] == 2, d


# --- 2. sharded == single device -----------------------------------------------------

def test_sharded_matches_single_device(sharded, single):
  got, want = losses_by_step(sharded.rows), losses_by_step(single)
  assert sorted(want) == list(range(1, 7)) and set(got) <= set(want)
  for s, loss in got.items():
    np.testing.assert_allclose(loss, want[s], rtol=1e-5, err_msg=f"step {s}")


def test_tensor_parallel_runs_and_matches(tmp_path, sharded, single):
  config = fast_config(sharded, {"mesh.data": 4, "mesh.tensor": 2})
  result = runner.run(config, str(tmp_path))
  specs = [str(x.sharding.spec) for x in jax.tree.leaves(result["params"])]
  assert any("tensor" in s for s in specs)  # some weights really are split over 'tensor'
  got = losses_by_step(read_jsonl(tmp_path / "metrics.jsonl"))
  want = losses_by_step(single)
  assert sorted(got) == sorted(want)
  for s in got:
    np.testing.assert_allclose(got[s], want[s], rtol=1e-5, err_msg=f"step {s}")


# --- 3. the compiled step's collectives --------------------------------------------

def instructions(hlo: str):
  """(result shapes, opcode, op_name) of every HLO instruction but parameters."""
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*(.+?)\s+([a-z][\w-]*)\(")
  for line in hlo.splitlines():
    m = pattern.match(line)
    if m and m.group(2) != "parameter":
      name = re.search(r'op_name="([^"]*)"', line)
      yield re.findall(r"\w+\[[\d,]*\]", m.group(1)), m.group(2), name.group(1) if name else ""


def test_hlo_gathers_embeddings_never_builds_global_affinity(sharded):
  local = BATCH // 8  # data=4 × fsdp=2
  ops = list(instructions(sharded.hlo))
  loss_ops = [op for op in ops if "shard_map" in op[2]]  # the loss runs inside shard_map
  assert len(ops) > 1000 and loss_ops
  # Every device all-gathers the B × D embeddings ...
  assert any(f"f32[{BATCH},{EMBED}]" in shapes and code.startswith("all-gather")
             for shapes, code, _ in loss_ops)
  # ... and computes its B_local × B block of the affinities (this finds them, so the
  # pattern below is able to match) ...
  block = re.compile(rf"f32\[(?:\d+,)*{local},{BATCH}\]$")
  assert sum(any(block.match(s) for s in shapes) for shapes, _, _ in loss_ops) >= 8
  # ... and no B × B array (nor a batch of them) exists outside the towers. (The text
  # tower has [16,16] arrays of its own: 16 captions' end-of-text features, 32 channels
  # split in 2 by fsdp; they are model ops, named CLIP/...)
  square = re.compile(rf"f32\[(?:\d+,)*{BATCH},{BATCH}\]$")
  squares = [op for op in ops if any(square.match(s) for s in op[0])]
  assert not [op for op in squares if "CLIP" not in op[2]], squares
  assert square.match(f"f32[{BATCH},{BATCH}]") and square.match(f"f32[4,{BATCH},{BATCH}]")


# --- 4. the CLI, and resume after SIGKILL ---------------------------------------------

RESUME_STEPS = 20  # enough steps after the first checkpoint (3) to SIGKILL the run mid-way
CLI_OVERRIDES = [f"--config.total_steps={RESUME_STEPS}", "--config.checkpoint_every=3",
                 "--config.log_every=1", "--config.eval.tasks="]


def cli(workdir, *args, devices=1, log=None, cache=None) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache:  # runs of one config compile once
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "-m", "tinyclip_jax.main", f"--config={SMOKE}", f"--workdir={workdir}",
         *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=open(log, "w") if log else subprocess.PIPE, text=True)


def logged_steps(jsonl: Path) -> list[int]:
  steps = []
  if jsonl.exists():
    for line in jsonl.read_text().splitlines():
      try:
        steps.append(json.loads(line)["step"])
      except ValueError:  # a line being written
        pass
  return steps


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, sharded):
  """Run A uninterrupted; run B SIGKILLed after its first checkpoint and a step past it,
  then restarted in the same workdir. All on one device, one after the other (B reuses
  A's compiled programs from the persistent compilation cache)."""
  base = tmp_path_factory.mktemp("cli")
  a_dir, b_dir = base / "a", base / "b"
  args = [*CLI_OVERRIDES, f"--config.teacher.checkpoint={sharded.teacher}"]
  a = cli(a_dir, *args, log=base / "a.log", cache=base / "cache")
  a.wait(timeout=400)
  b = cli(b_dir, *args, log=base / "b1.log", cache=base / "cache")
  deadline = time.time() + 400
  while b.poll() is None and time.time() < deadline:
    if (b_dir / "checkpoints" / "3").is_dir() and max(logged_steps(b_dir / "metrics.jsonl"),
                                                      default=0) >= 4:
      os.kill(b.pid, signal.SIGKILL)
      break
    time.sleep(0.02)
  b.wait(timeout=60)
  killed_at = logged_steps(b_dir / "metrics.jsonl")
  b2 = cli(b_dir, *args, log=base / "b2.log", cache=base / "cache")
  b2.wait(timeout=400)
  return types.SimpleNamespace(a_dir=a_dir, b_dir=b_dir, a_rc=a.returncode, b_rc=b.returncode,
                               b2_rc=b2.returncode, killed_at=killed_at,
                               a_log=(base / "a.log").read_text(),
                               b2_log=(base / "b2.log").read_text())


def test_cli_entry_with_overrides(cli_runs):
  assert cli_runs.a_rc == 0, cli_runs.a_log[-3000:]
  rows = read_jsonl(cli_runs.a_dir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, RESUME_STEPS + 1))  # total_steps, log_every
  assert not any(k.startswith("eval/") for r in rows for k in r)     # eval.tasks=''
  ckpts = sorted(int(p.name) for p in (cli_runs.a_dir / "checkpoints").iterdir())
  assert ckpts == [15, 18, 20]  # checkpoint_every=3, keep_checkpoints=3, and the last step
  _, cfg = model_io.load_model(str(cli_runs.a_dir / "final"))
  assert cfg.vision.width == 32
  assert "Traceback" not in cli_runs.a_log


def test_resume_after_sigkill_continues_bit_equal(cli_runs):
  assert cli_runs.b_rc == -signal.SIGKILL, "run B ended before it could be killed"
  assert max(cli_runs.killed_at) >= 4
  assert cli_runs.b2_rc == 0, cli_runs.b2_log[-3000:]
  resumed = re.search(r"resumed from step (\d+)", cli_runs.b2_log)
  assert resumed and int(resumed.group(1)) >= 3 and int(resumed.group(1)) % 3 == 0
  a = read_jsonl(cli_runs.a_dir / "metrics.jsonl")
  b = read_jsonl(cli_runs.b_dir / "metrics.jsonl")
  assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, RESUME_STEPS + 1))
  for ra, rb in zip(a, b):
    assert ra["loss"] == rb["loss"], (ra["step"], ra["loss"], rb["loss"])
    assert ra["grad_norm"] == rb["grad_norm"], ra["step"]
  params_a, _ = model_io.load_model(str(cli_runs.a_dir / "final"))
  params_b, _ = model_io.load_model(str(cli_runs.b_dir / "final"))
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


# --- 5. bad input: one sentence, exit 2, before any compilation -------------------------

def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_sentence(stderr: str, *words: str) -> str:
  lines = error_lines(stderr)
  assert len(lines) == 1, stderr[-3000:]
  assert "Traceback" not in stderr and "compiled the train step" not in stderr
  line = lines[0]
  assert line.endswith("."), line
  for w in words:
    assert w in line, (w, line)
  return line


@pytest.mark.parametrize("flag, words", [
    ("--config.nonexistent=1", ("--config.nonexistent", "check the spelling")),
    ("--config.mesh.dta=3", ("--config.mesh.dta", "did you mean 'data'?")),
])
def test_unknown_config_field_cli(flag, words, tmp_path):
  workdir = tmp_path / "run"
  t0 = time.time()
  p = cli(workdir, flag, devices=8)
  _, stderr = p.communicate(timeout=120)
  assert p.returncode == 2, stderr[-3000:]
  assert_one_sentence(stderr, *words, "tinyclip_jax/train/defaults.py")
  assert not workdir.exists()
  assert time.time() - t0 < 60


def test_retired_eval_kind_cli(tmp_path):
  workdir = tmp_path / "run"
  p = cli(workdir, "--config.eval.kind=synthetic")
  _, stderr = p.communicate(timeout=120)
  assert p.returncode == 2, stderr[-3000:]
  assert_one_sentence(stderr, "--config.eval.kind", "eval.kind is gone", "list the periodic "
                      "evaluations in eval.tasks", "eval.tasks='synthetic'")
  assert not workdir.exists()


def test_impossible_mesh_cli(tmp_path):
  workdir = tmp_path / "run"
  t0 = time.time()
  p = cli(workdir, "--config.mesh.data=3", devices=8)
  _, stderr = p.communicate(timeout=120)
  assert p.returncode == 2, stderr[-3000:]
  assert_one_sentence(stderr, "mesh", "3 devices", "8 are available", "-1")
  assert not workdir.exists() or not list(workdir.iterdir())
  assert time.time() - t0 < 90


class CompileCounter:
  """Counts XLA compilations (jax's backend-compile event) while active."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    from jax._src import monitoring  # pylint: disable=import-outside-toplevel
    monitoring.unregister_event_duration_listener(self)


def run_main(monkeypatch, config, workdir) -> int:
  """tinyclip_jax.main.main in process, with the parsed flags given directly."""
  monkeypatch.setattr(main_lib, "FLAGS", types.SimpleNamespace(config=config,
                                                               workdir=str(workdir)))
  return main_lib.main(["tinyclip_jax.main"])


@pytest.mark.parametrize("overrides, words", [
    ({"mesh.data": 3}, ("mesh", "needs 3 devices", "-1")),
    ({"mesh.fsdp": 3, "mesh.data": -1}, ("mesh", "not divisible by 3")),
    ({"batch_size": 12}, ("batch_size 12", "data-parallel size 8", "multiple of 8")),
    ({"student.custom.vision_width": 128}, ("vision", "128", "64", "no wider than its teacher")),
    ({"teacher.checkpoint": "/nonexistent/teacher"},
     ("teacher.checkpoint", "/nonexistent/teacher", "does not exist", "tinyclip_jax.convert")),
    ({"precision": "float16"}, ("precision", "float16", "'bfloat16'")),
    ({"student.custom.image_size": 64}, ("image_size", "same images")),
    ({"profile.num_steps": 2}, ("profile.num_steps", "profile.start_step is 0")),
], ids=["mesh", "mesh-fill", "batch", "wider-student", "no-teacher-checkpoint", "float16",
        "image-size", "profile"])
def test_bad_config_fails_before_compiling(overrides, words, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  with CompileCounter() as compiles:
    t0 = time.time()
    rc = run_main(monkeypatch, smoke_config(overrides), workdir)
    elapsed = time.time() - t0
  assert rc == 2
  assert_one_sentence(capsys.readouterr().err, *words)
  assert compiles.count == 0
  assert elapsed < 20
  assert not workdir.exists() or not list(workdir.iterdir())  # at most an empty workdir


# --- 6. non-finite losses ---------------------------------------------------------------

def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, sharded, monkeypatch,
                                                          capsys, compile_cache):
  config = fast_config(sharded, {"checkpoint_every": 1})
  assert config.max_nonfinite == 2 and config.total_steps == 6
  first_bad = 3
  next_batch = pipeline.SyntheticPairs.__next__

  def poisoned(self):
    batch = next_batch(self)
    step = self.position // self.global_batch  # the step this batch feeds
    if step >= first_bad:
      batch = dict(batch, images=np.full_like(batch["images"], np.nan))
    return batch

  saved = {}

  def record(mgr, step, state, data_state, config_json, model=None):  # params after each step
    saved[step] = prepare.as_numpy(state.params)
    return True

  mesh_on(monkeypatch, jax.devices()[:1])
  monkeypatch.setattr(pipeline.SyntheticPairs, "__next__", poisoned)
  monkeypatch.setattr(checkpoint, "save", record)
  rc = run_main(monkeypatch, config, tmp_path)
  line = assert_one_sentence(capsys.readouterr().err, "2 non-finite losses in a row",
                             "optimizer.lr")
  assert rc == 2, line
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [r["nonfinite_total"] for r in rows] == [0, 0, 1, 2]
  assert [r["nonfinite_in_a_row"] for r in rows] == [0, 0, 1, 2]
  assert np.isfinite(rows[1]["loss"]) and not np.isfinite(rows[2]["loss"])
  assert not (tmp_path / "final").exists()
  # Steps 3 and 4 left the parameters exactly as step 2 did; step 2 did change them.
  for s in (3, 4):
    jax.tree.map(np.testing.assert_array_equal, saved[s], saved[2])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), saved[2], saved[1])
  assert any(jax.tree.leaves(changed))


def test_resume_drops_lines_after_the_checkpoint_and_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 3}\n\n{"step": 4}\n{"step": 5, "lo')
  metrics_lib.truncate_jsonl(str(path), 3)
  assert path.read_text() == '{"step": 1}\n{"step": 3}\n'
