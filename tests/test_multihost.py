"""Multi-host runs on this machine: two processes on loopback (CPU collectives over
gloo), 4 simulated devices each, against one process with 8 devices.

Checks: the 2-process run logs the same losses as the 1-process run (same global
batch, same math; float32 rounding only), with text buckets on (the processes agree
on each batch's bucket though their own rows pick different ones) against full-length
text, and logs model FLOPs at each step's bucket length; only process 0 writes
metrics; a SIGTERM on one process (a preemption notice) saves a checkpoint on both and
exits 0, and that checkpoint resumes in a 1-process run; a coordinator that is not
there is one sentence after the timeout, not a hang.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tinyclip_jax import model_io, parallel
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.models import param_shapes
from tinyclip_jax.train import defaults, loop, prepare, runner, teacher as teacher_lib
from test_train import ROOT, SMOKE, smoke_config

pytestmark = pytest.mark.xdist_group("multihost")

STEPS = 10
OVERRIDES = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=5",
             "--config.log_every=1", "--config.eval.tasks=", "--config.mesh.data=-1"]
# The smoke captions need 24–31 of the 32 positions per half-batch: with these, the two
# processes' own rows pick different buckets at some steps, each way round.
BUCKETS = (28, 32)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, process_id: int, num: int, port: int, *extra, devices=4, fault=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TINYCLIP_FAULT=fault, TINYCLIP_FAULT_PROCESS="0")
  cmd = [sys.executable, "-m", "tinyclip_jax.main", f"--config={SMOKE}", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", f"--num_processes={num}",
         f"--process_id={process_id}", *OVERRIDES, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


PREEMPTED_AT = 6  # process 0 gets a SIGTERM after this step (the preemption notice)


def _launch_both(workdir, teacher, fault=""):
  port = free_port()
  flag = f"--config.text_buckets=({','.join(map(str, BUCKETS))})"
  procs = [launch(workdir, i, 2, port, flag, f"--config.teacher.checkpoint={teacher}",
                  fault=fault) for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, compile_cache):
  """The smoke config's random teacher, initialised once here and saved: every run below
  loads it (the same weights in each) instead of compiling its initialisation again."""
  c = smoke_config({"mesh.data": -1})
  t = teacher_lib.load(c, parallel.make_mesh(c.mesh.to_dict()))
  path = tmp_path_factory.mktemp("teacher") / "model"
  model_io.save_model(str(path), prepare.as_numpy(t.params), t.config)
  return path


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, teacher):
  """The 2-process run, preempted: process 0 gets a SIGTERM after step 6; both save at
  the step jax's preemption service agrees on and exit 0. The run then resumes in this
  one process (8 devices) and finishes: a 2-process checkpoint resumes in one process."""
  workdir = tmp_path_factory.mktemp("two_hosts")
  _launch_both(workdir, teacher, fault=f"term_at_step:{PREEMPTED_AT}")
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  stopped_at = read_jsonl(workdir / "metrics.jsonl")[-1]["step"]
  assert not (workdir / "final").exists()  # preempted: nothing exported
  c = smoke_config({"total_steps": STEPS, "checkpoint_every": 5, "log_every": 1,
                    "eval.tasks": "", "mesh.data": -1, "text_buckets": BUCKETS,
                    "teacher.checkpoint": str(teacher)})
  result = runner.run(c, str(workdir))
  return workdir, saved, stopped_at, result


@pytest.fixture(scope="module")
def one_host(tmp_path_factory, teacher):
  workdir = tmp_path_factory.mktemp("one_host")
  c = smoke_config({"total_steps": STEPS, "checkpoint_every": 5, "log_every": 1,
                    "eval.tasks": "", "mesh.data": -1, "teacher.checkpoint": str(teacher)})
  runner.run(c, str(workdir))  # in-process: 8 devices (tests/conftest.py)
  return workdir


def test_a_sigterm_on_one_process_saves_on_both_and_exits_0(two_hosts):
  """The first launch ended (both processes, exit 0: the fixture) at a preemption
  checkpoint after the notice and before the run's end; nothing was exported."""
  _, saved, stopped_at, _ = two_hosts
  assert saved[-1] == stopped_at and PREEMPTED_AT < stopped_at < STEPS, (saved, stopped_at)
  assert 5 in saved  # the regular checkpoint before it


def test_two_processes_log_the_losses_of_one(two_hosts, one_host):
  two_hosts = two_hosts[0]
  two = read_jsonl(two_hosts / "metrics.jsonl")
  one = read_jsonl(one_host / "metrics.jsonl")
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # one writer: process 0
  for a, b in zip(two, one):
    for key in ("loss", "affinity_i2t", "affinity_t2i", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"step {a['step']} {key}")


def test_two_processes_agree_on_the_text_bucket(two_hosts, one_host):
  """Steps where process 0's rows need a longer bucket than process 1's, and steps where
  it is the other way round; every step runs the bucket of the longest caption of the
  global batch (found here by hand). (The losses: the test above.)"""
  from tinyclip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  c = smoke_config()
  source = pipeline.SyntheticPairs(c.data, 32, 32, c.batch_size)  # the global batch
  bucket = lambda n: min(b for b in BUCKETS if b >= n)  # noqa: E731
  local, agreed = [], []
  for _ in range(STEPS):
    tokens = next(source)["tokens"]
    ends = [list(row).index(49407) + 1 for row in tokens]  # through the first end-of-text
    half = len(ends) // 2  # process 0's rows, then process 1's
    local.append((bucket(max(ends[:half])), bucket(max(ends[half:]))))
    agreed.append(bucket(max(ends)))
  assert any(a > b for a, b in local) and any(a < b for a, b in local), local
  assert set(agreed) == set(BUCKETS)
  assert [r["text_bucket"] for r in read_jsonl(two_hosts[0] / "metrics.jsonl")] == agreed
  assert {r["text_bucket"] for r in read_jsonl(one_host / "metrics.jsonl")} == {32}  # off


def flops_per_pair(cfg, passes: int, text_length: int) -> float:
  """passes (6: trained, 2: forward) × tokens × the matmul weights of the transformer
  layers, counted from the model's own parameter tree."""
  shapes = jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
  def weights(tower):
    return sum(x.size for path, x in shapes if path[0].key == tower and
               path[1].key.startswith("layers_") and path[-1].key.endswith("kernel"))
  v = cfg.vision
  return passes * (weights("visual") * ((v.image_size // v.patch_size) ** 2 + 1) +
                   weights("text") * text_length)


def test_logged_model_flops_count_the_bucket_length(two_hosts):
  """Each logged model_flops_per_s counts its step's text bucket (28 or 32 tokens,
  both present: the test above), not the full context."""
  c = smoke_config()
  student, teacher = (defaults.build_model_config(m, "model") for m in (c.student, c.teacher))
  rows = read_jsonl(two_hosts[0] / "metrics.jsonl")
  for r in rows:
    n = r["text_bucket"]
    want = flops_per_pair(student, 6, n) + flops_per_pair(teacher, 2, n)
    assert r["model_flops_per_s"] == pytest.approx(want * r["pairs_per_s"], rel=1e-9), r


def test_a_two_process_checkpoint_resumes_in_one_process(two_hosts):
  """The fixture's second half: one process restored the 2-process preemption
  checkpoint, logged exactly the remaining steps and exported (the losses of every step
  against the 1-process run: test_two_processes_log_the_losses_of_one)."""
  workdir, _, stopped_at, result = two_hosts
  assert result["step"] == STEPS and not result.get("preempted")
  steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")]
  assert steps == list(range(1, STEPS + 1)), steps  # each once: the replay was truncated
  params, _ = model_io.load_model(workdir / "final")
  for (path, a), (_, b) in zip(_leaves(params), _leaves(result["params"])):
    np.testing.assert_array_equal(a, b, err_msg=path)


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_an_absent_coordinator_is_one_sentence_after_the_timeout(tmp_path):
  p = launch(tmp_path / "w", 1, 2, free_port(), "--distributed_timeout=5")
  _, err = p.communicate(timeout=120)
  assert p.returncode == 2
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "could not reach the coordinator" in errors[0], err[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2"], "together"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
     "is not in [0, --num_processes=2)"),
])
def test_inconsistent_cluster_flags_are_refused(flags, message, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "tinyclip_jax.main", f"--config={SMOKE}",
                      f"--workdir={tmp_path / 'w'}", *flags], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
  assert not (tmp_path / "w").exists()
