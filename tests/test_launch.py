"""launch/tpu_vm.sh and launch/gpu_slurm.sbatch: the exact commands they would run
(dry run), the same commands really run against stand-in gcloud/python3 programs, the
remote command strings executed by a local bash, and usage errors."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sbatch"
REMOTE = "$HOME/tinyclip_jax"

BASE = ["--name=tc", "--zone=us-central2-b"]
CREATE = ["--type=v4-32", "--version=tpu-ubuntu2204-base"]
RUN = ["--config=configs/vit39m.py", "--workdir=gs://bucket/run"]
# Arguments with a space, braces, a quote and a dollar sign survive two shells.
MAIN_ARGS = [
    "--config.teacher.checkpoint=gs://bucket/ckpt/openai vit-b-16",
    "--config.data.train=gs://bucket/yfcc/{00000..01499}.tar",
    "--config.student.custom.activation=it's $HOME"
]


def bash(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  clean = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("TPU_", "SLURM_", "REPO_")) and k not in ("CONFIG", "WORKDIR", "DRY_RUN",
                                                                     "GPUS_PER_NODE", "XLA_FLAGS")
  }
  return subprocess.run(["bash", str(script), *args],
                        env={
                            **clean,
                            **(env or {})
                        },
                        capture_output=True,
                        text=True,
                        timeout=60,
                        cwd=ROOT)


def lines(result: subprocess.CompletedProcess) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def gcloud(verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, "tc", *rest]


def split_ssh(argv: list[str]) -> tuple[list[str], str]:
  """(the ssh command without --command, the remote command string)."""
  [command] = [a for a in argv if a.startswith("--command=")]
  return [a for a in argv if a != command], command[len("--command="):]


def remote_main(remote: str) -> list[str]:
  """The training command inside the run's remote string, as the worker's bash -c sees it."""
  words = shlex.split(remote)
  inner = shlex.split(words[words.index("-c") + 1])
  assert inner[inner.index(";"):] == [";", "echo", "$?", ">", "$HOME/tinyclip_run.rc"]
  return inner[:inner.index(";")]


def ssh(worker: str, project: list[str] | None = None) -> list[str]:
  return gcloud("ssh", "--zone=us-central2-b", *(project or []), f"--worker={worker}")


# --- tpu_vm.sh: dry run ---------------------------------------------------------------


def test_tpu_all_dry_run_prints_every_command():
  out = lines(
      bash(
          TPU,
          "--dry-run",
          "all",
          *BASE,
          *CREATE,
          *RUN,
          "--",
          *MAIN_ARGS,
          env={"TMPDIR": "/scratch"}))
  archive = "/scratch/tinyclip_jax-tc.tar.gz"
  assert out[0] == gcloud("create", "--zone=us-central2-b", "--accelerator-type=v4-32",
                          "--version=tpu-ubuntu2204-base")
  assert out[1] == [
      "git", "-C",
      str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"
  ]
  assert out[2] == [
      "gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "tc:tinyclip_jax.tar.gz",
      "--zone=us-central2-b", "--worker=all"
  ]
  setup, setup_remote = split_ssh(out[3])
  assert setup == ssh("all")
  assert setup_remote == (
      f"rm -rf {REMOTE} && mkdir -p {REMOTE} && tar -xzf $HOME/tinyclip_jax.tar.gz -C {REMOTE} "
      f"&& python3 -m pip install -U pip && python3 -m pip install -e {REMOTE} 'jax[tpu]'")
  start, start_remote = split_ssh(out[4])
  assert start == ssh("all")  # the same program on every worker
  assert remote_main(start_remote) == [
      "python3", "-m", "tinyclip_jax.main", "--config=configs/vit39m.py",
      "--workdir=gs://bucket/run", "--distributed=on", *MAIN_ARGS
  ]
  follow, follow_remote = split_ssh(out[5])
  assert follow == ssh("0")
  assert follow_remote == ("tail -n +1 --pid=$(cat $HOME/tinyclip_run.pid) -f "
                           "$HOME/tinyclip_run.log")
  rc, rc_remote = split_ssh(out[6])
  assert rc == ssh("0") and rc_remote.startswith("exit $(cat $HOME/tinyclip_run.rc")
  assert out[7] == gcloud("delete", "--zone=us-central2-b", "--quiet")  # teardown, last
  assert len(out) == 8


def test_tpu_relaunch_dry_run_shows_the_loop():
  """relaunch: a Spot slice, the run, the status check that decides whether the run
  finished (a preempted run exits 0 without exporting), the teardown, then the loop."""
  out = lines(bash(TPU, "--dry-run", "relaunch", *BASE, *CREATE, *RUN, "--attempts=3", "--",
                   *MAIN_ARGS, env={"TMPDIR": "/scratch"}))
  assert out[0] == gcloud("create", "--zone=us-central2-b", "--accelerator-type=v4-32",
                          "--version=tpu-ubuntu2204-base", "--spot")
  assert out[-3] == ["python3", "-m", "tinyclip_jax.status", "--config=configs/vit39m.py",
                     "--workdir=gs://bucket/run", *MAIN_ARGS]
  assert out[-2] == gcloud("delete", "--zone=us-central2-b", "--quiet")
  assert out[-1][:2] == ["#", "relaunch:"] and "3" in out[-1]


def test_tpu_relaunch_needs_a_gcs_workdir():
  r = bash(TPU, "--dry-run", "relaunch", *BASE, *CREATE, "--config=configs/vit39m.py",
           "--workdir=/tmp/run")
  assert r.returncode == 2 and r.stderr.startswith("error: relaunch needs a gs:// --workdir")


def test_tpu_options_from_environment_project_spot_and_repo():
  env = {
      "TPU_NAME": "tc",
      "TPU_ZONE": "us-central2-b",
      "TPU_TYPE": "v5litepod-16",
      "TPU_VERSION": "v2-alpha-tpuv5-lite",
      "TPU_PROJECT": "proj",
      "TPU_SPOT": "1",
      "REPO_URL": "https://example.com/tinyclip_jax.git",
      "REPO_REF": "v1.0"
  }
  out = lines(bash(TPU, "--dry-run", "create", env=env))
  assert out == [
      gcloud("create", "--zone=us-central2-b", "--project=proj", "--accelerator-type=v5litepod-16",
             "--version=v2-alpha-tpuv5-lite", "--spot")
  ]
  [setup] = lines(bash(TPU, "--dry-run", "setup", env=env))
  argv, remote = split_ssh(setup)
  assert argv == ssh("all", ["--project=proj"])
  assert remote.startswith(f"rm -rf {REMOTE} && git clone --depth=1 --branch=v1.0 "
                           f"https://example.com/tinyclip_jax.git {REMOTE} && ")
  assert lines(
      bash(TPU, "--dry-run", "delete",
           env=env)) == [gcloud("delete", "--zone=us-central2-b", "--project=proj", "--quiet")]


def test_tpu_run_detach_and_logs_of_another_worker():
  out = lines(bash(TPU, "--dry-run", "run", "--detach", *BASE, *RUN))
  assert len(out) == 1 and split_ssh(out[0])[0] == ssh("all")
  [logs] = lines(bash(TPU, "--dry-run", "logs", *BASE, "--worker=3"))
  assert split_ssh(logs)[0] == ssh("3")


@pytest.mark.parametrize("args, words", [
    ([], "no command given"),
    (["start", *BASE], "unknown command 'start'"),
    (["create", "--zone=z", *CREATE], "create needs --name (or $TPU_NAME)"),
    (["create", "--name=a", *CREATE], "create needs --zone (or $TPU_ZONE)"),
    (["create", *BASE, "--version=v"], "create needs --type (or $TPU_TYPE)"),
    (["all", *BASE, *CREATE, "--config=c"], "all needs --workdir (or $WORKDIR)"),
    (["run", *BASE, "--workdir=w"], "run needs --config (or $CONFIG)"),
    (["run", *BASE, *RUN, "--bogus"], "unknown option --bogus"),
    (["all", *BASE, *CREATE, *RUN, "--detach"], "--detach does not go with all"),
    (["logs", *BASE, "--worker=x"], "--worker=x is not a worker index"),
])
def test_tpu_usage_errors(args, words):
  result = bash(TPU, "--dry-run", *args)
  assert result.returncode == 2 and result.stdout == ""
  [line] = result.stderr.splitlines()
  assert line.startswith(f"error: {words}") and "usage: launch/tpu_vm.sh" in line, line


# --- tpu_vm.sh: the same commands really run ----------------------------------------


def stub(folder: Path, name: str, body: str) -> None:
  path = folder / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_runs_the_printed_commands(tmp_path):
  """Without --dry-run the script runs exactly the printed commands (gcloud here is a
  stand-in that records its arguments), and deletes the slice when the run fails."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls"
  # ssh of the rc check fails, as a failed run would; everything else succeeds.
  stub(
      bin_dir, "gcloud", f'printf "%s\\0" "$@" >> {log}; echo >> {log}\n'
      '[[ "$*" != *"exit \\$(cat"* ]] || exit 3\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  args = ["all", *BASE, *CREATE, *RUN, "--", *MAIN_ARGS]
  real = bash(TPU, *args, env=env)
  assert real.returncode == 3, real.stderr
  calls = [c.split("\0") for c in log.read_text().split("\0\n")[:-1]]
  printed = [c for c in lines(bash(TPU, "--dry-run", *args, env=env)) if c[0] == "gcloud"]
  assert calls == [c[1:] for c in printed]
  assert calls[-1][3] == "delete"  # torn down although the run failed
  assert (tmp_path / "tinyclip_jax-tc.tar.gz").stat().st_size > 0  # git archive ran


def test_tpu_remote_commands_run_in_a_worker_shell(tmp_path):
  """The run / logs / exit-code strings, executed by bash in a stand-in worker home with
  a stand-in python3: the training command gets exactly its arguments, runs detached,
  its output and exit code land in the files `logs` and `run` read."""
  home = tmp_path / "home"
  (home / "tinyclip_jax").mkdir(parents=True)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stub(bin_dir, "python3", 'printf "%s\\n" "$@" > "$HOME/argv"; echo training; exit 7\n')
  out = lines(bash(TPU, "--dry-run", "all", *BASE, *CREATE, *RUN, "--", *MAIN_ARGS))
  start, follow, rc = (split_ssh(c)[1] for c in out[4:7])
  env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  subprocess.run(["bash", "-c", start], env=env, check=True, timeout=30)
  deadline = time.time() + 20
  while not (home / "tinyclip_run.rc").exists() and time.time() < deadline:
    time.sleep(0.05)
  assert (home / "argv").read_text().splitlines() == [
      "-m", "tinyclip_jax.main", "--config=configs/vit39m.py", "--workdir=gs://bucket/run",
      "--distributed=on", *MAIN_ARGS
  ]
  assert (home / "tinyclip_run.rc").read_text().strip() == "7"
  assert int((home / "tinyclip_run.pid").read_text()) > 0
  logs = subprocess.run(["bash", "-c", follow], env=env, capture_output=True, text=True, timeout=30)
  assert logs.stdout == "training\n"
  assert subprocess.run(["bash", "-c", rc], env=env, timeout=30).returncode == 7


# --- gpu_slurm.sbatch -----------------------------------------------------------------

SLURM_ENV = {"CONFIG": "configs/vit39m.py", "WORKDIR": "/shared/runs/39m", "DRY_RUN": "1"}


def srun(nodes: int, tasks: int) -> list[str]:
  return [
      "srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks}", "--kill-on-bad-exit=1",
      "--cpu-bind=none", "--label", "python3", "-m", "tinyclip_jax.main",
      "--config=configs/vit39m.py", "--workdir=/shared/runs/39m", *MAIN_ARGS
  ]


def test_slurm_one_process_per_node_sees_all_its_gpus():
  env = {
      **SLURM_ENV, "SLURM_JOB_NUM_NODES": "4",
      "SLURM_NTASKS_PER_NODE": "1",
      "SLURM_GPUS_ON_NODE": "8"
  }
  out = lines(bash(SLURM, *MAIN_ARGS, env=env))
  assert out == [["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"],
                 ["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"],
                 ["export", "NCCL_DEBUG=WARN"], ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"],
                 srun(4, 1)]


def test_slurm_one_process_per_gpu_keeps_user_settings():
  env = {
      **SLURM_ENV, "SLURM_JOB_NUM_NODES": "2",
      "SLURM_NTASKS_PER_NODE": "4",
      "GPUS_PER_NODE": "4",
      "XLA_FLAGS": "--xla_dump_to=/tmp/x",
      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75",
      "NCCL_DEBUG": "INFO"
  }
  out = lines(bash(SLURM, *MAIN_ARGS, env=env))
  assert out == [["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75"],
                 [
                     "export", "XLA_FLAGS=--xla_dump_to=/tmp/x "
                     "--xla_gpu_enable_latency_hiding_scheduler=true"
                 ], ["export", "NCCL_DEBUG=INFO"],
                 srun(2, 4)]  # no JAX_LOCAL_DEVICE_IDS: JAX takes GPU SLURM_LOCALID itself


@pytest.mark.parametrize("env, words", [
    ({
        "CONFIG": ""
    }, "CONFIG is not set"),
    ({
        "WORKDIR": ""
    }, "WORKDIR is not set"),
    ({
        "GPUS_PER_NODE": ""
    }, "cannot tell how many GPUs a node has"),
    ({
        "SLURM_NTASKS_PER_NODE": "3"
    }, "--ntasks-per-node=3 is neither 1"),
])
def test_slurm_usage_errors(env, words):
  full = {**SLURM_ENV, "GPUS_PER_NODE": "8", "PATH": "/usr/bin:/bin", **env}
  result = bash(SLURM, env=full)
  assert result.returncode == 2 and result.stdout == ""
  [line] = result.stderr.splitlines()
  assert line.startswith(f"error: {words}") and "usage: CONFIG=FILE WORKDIR=DIR sbatch" in line
