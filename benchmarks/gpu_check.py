"""One prepared accelerator check: the 39M/16 ← B/16 distillation step in bfloat16 on one
GPU, JAX against the same math in PyTorch, in a single call of under 8 minutes.

python -m benchmarks.gpu_check --out=$OUT/gpu_check.jsonl       # on a GPU machine
python -m benchmarks.gpu_check --dry-run --out=/tmp/check.jsonl # CPU, tiny models (tests)

It runs from the source tree, not an install: the workers get the repository root on
PYTHONPATH, and each wheel in .gpu_wheels/ whose modules this Python lacks (pure-Python
ones: a wheel is a zip Python imports from; benchmarks/README.md, "GPU check"). Nothing
on its path imports TensorFlow, PIL or the tokenizer. It prints, and writes to --out as
they come, JSON lines:

- "ladder": the compiled memory of the batch sizes tried, the largest that fits, and
  the batch sizes timed (benchmarks/gpu_check_jax.py, a process of its own).
- "jax", one per config: three batch sizes, then remat and cached teacher embeddings at
  the largest; pairs/s, median step time, MFU against the device's dense bf16 peak
  (benchmarks/peak.py; FLOPs as benchmarks/train_step.py counts them), peak memory.
- "torch": the same step in PyTorch (bf16 autocast, SDPA, fused AdamW) in a process of its
  own, after JAX has let the GPU go, at the largest of those batch sizes that fits it.
- "summary" last: the best MFU, the speed-up over PyTorch at the same batch, and the goals.

A config that fails is a line with its "error" and the rest still run; each part has a
share of --budget_s and stops timing steps when it is spent.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zipfile

from benchmarks import peak, train_step as ts
from tinyclip_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = ".gpu_wheels"
GOAL_MFU, GOAL_SPEEDUP = 0.40, 1.3
JAX_SHARE = 0.68  # of the budget; PyTorch gets what is left
GRACE_S = 30      # past its own budget before the JAX worker is stopped
MIN_TORCH_S = 20  # less than this left, and PyTorch is not started


@dataclasses.dataclass(frozen=True)
class Plan:
  student: str               # zoo names, or "tiny" for the dry run's tiny models
  teacher: str
  image: int
  precision: str
  ladder: tuple[int, ...]    # batch sizes the largest is picked from
  probe: int                 # index of the two rungs the memory line is drawn through
  warmup: int
  steps: int
  budget_s: float
  device: str = "cuda"       # PyTorch's
  cpu_matmul: int = 2048     # size of the matmul that measures a CPU's peak


PLANS = {
    "gpu": Plan("TinyCLIP-ViT-39M-16-Text-19M", "ViT-B-16", 224, "bfloat16",
                (64, 128, 256, 512, 1024, 2048, 4096), probe=2, warmup=3, steps=10,
                budget_s=450),
    # A generous budget: the dry run measures nothing, and a busy CPU must not cut it short.
    "dry": Plan("tiny", "tiny", 32, "bfloat16", (2, 4), probe=0, warmup=1, steps=2,
                budget_s=480, device="cpu", cpu_matmul=256),
}


def model_configs(plan: Plan):
  """[student, teacher] configs of a plan."""
  if plan.student != "tiny":
    return ts.model_configs(plan.student, plan.teacher, plan.image)
  from tinyclip_jax.models import (  # pylint: disable=import-outside-toplevel
      CLIPConfig, text_tower, vision_tower)

  def tiny(width, layers, heads):
    return CLIPConfig(32, vision_tower(width, layers, 8, image_size=plan.image, heads=heads,
                                       mlp=2 * width, head_dim=32),
                      text_tower(width, layers, heads=heads, mlp=2 * width, head_dim=32,
                                 context_length=16, vocab_size=100))
  return [tiny(32, 1, 1), tiny(64, 1, 2)]


def one_line(e: BaseException) -> str:
  return cli.one_line(e)[:500]  # XLA's messages can run to pages


# --------------------------------------------------------------------------- PyTorch


def run_torch(plan: Plan, batches, budget_s: float, emit) -> None:
  """The PyTorch step at the first of `batches` that fits; one line per batch tried."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  deadline = time.monotonic() + budget_s
  student_cfg, teacher_cfg = model_configs(plan)
  cuda = plan.device == "cuda"
  known = peak.table_peak(torch.cuda.get_device_name()) if cuda else None
  common = {"gpu_check": "torch", "config": "batch", "student": plan.student,
            "teacher": plan.teacher, "image": plan.image, "precision": plan.precision,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__}
  for b in batches:
    line = dict(common, batch=b)
    try:
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      run_one = ts.torch_step(student_cfg, teacher_cfg, b, plan.device,
                              None if plan.precision == "float32" else plan.precision)
      times = ts.time_steps(run_one, plan.steps, plan.warmup, deadline)
      step_s = statistics.median(times)
      flops = prepare.model_flops_per_pair(student_cfg, teacher_cfg) * b / step_s
      line.update(steps=len(times), step_s=step_s, pairs_per_s=b / step_s,
                  model_flops_per_s=flops, mfu=known and flops / known[0],
                  peak_flops_per_s=known and known[0],
                  peak_source=f"table: {known[1]} dense bf16 peak" if known else "none on CPU",
                  peak_memory_mb=(torch.cuda.max_memory_allocated() / 2**20 if cuda else
                                  ts.peak_rss_mb()),
                  peak_memory_source=("torch.cuda.max_memory_allocated" if cuda else
                                      "process peak RSS"), error=None)
      emit(line)
      return
    except Exception as e:  # noqa: BLE001
      emit(dict(line, error=one_line(e)))
      if not (cuda and isinstance(e, torch.cuda.OutOfMemoryError)):
        return  # anything but running out of memory would fail the same at a smaller batch
    run_one = None  # the failed batch's models and optimizer go before the next try
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- driver


def wheel_paths(folder: str) -> list[str]:
  """The wheels in `folder` with a top-level module this Python cannot import itself."""
  out = []
  for wheel in sorted(glob.glob(os.path.join(folder, "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
      tops = {n.split("/")[0] for n in z.namelist()}
    tops = {t.removesuffix(".py") for t in tops if not t.endswith((".dist-info", ".data"))}
    if any(importlib.util.find_spec(t) is None for t in tops):
      out.append(wheel)
  return out


def worker_env(base: dict, dry_run: bool, wheels: list[str]) -> dict:
  env = dict(base)
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + wheels + [p for p in [base.get("PYTHONPATH")] if p])
  if dry_run:  # a CPU check wherever it runs; compiled fast, as it times nothing that counts
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  else:  # JAX's process is alone on the GPU while it runs
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
  return env


def run_worker(cmd, env: dict, timeout_s: float, side: str, on_line) -> str | None:
  """Runs a worker, passing on each JSON line it prints (its stderr goes to ours);
  returns a sentence when it failed."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT)
  tail = collections.deque(maxlen=1)

  def relay():
    for raw in proc.stderr:
      sys.stderr.write(raw)
      if raw.strip():
        tail.append(raw.strip())
  relayer = threading.Thread(target=relay, daemon=True)
  relayer.start()
  stopped = threading.Event()
  timer = threading.Timer(timeout_s, lambda: (stopped.set(), proc.kill()))
  timer.start()
  for raw in proc.stdout:
    try:
      line = json.loads(raw)
    except ValueError:
      line = None
    if isinstance(line, dict) and "gpu_check" in line:
      on_line(line)
    else:
      sys.stderr.write(raw)
  rc = proc.wait()
  timer.cancel()
  relayer.join()
  if stopped.is_set():
    return f"the {side} worker ran past {timeout_s:.0f} s and was stopped"
  if rc:
    return f"the {side} worker exited with code {rc}: {tail[-1][:500] if tail else 'no message'}"
  return None


def summarize(lines: list[dict]) -> dict:
  """The last line, from the others alone."""
  jax_ok, torch_ok = ([l for l in lines if l["gpu_check"] == side and not l.get("error")]
                      for side in ("jax", "torch"))
  with_mfu = [l for l in jax_ok if l.get("mfu") is not None]
  best = max(with_mfu, key=lambda l: l["mfu"], default=None)
  plain = {l["batch"]: l for l in jax_ok if l["config"] == "batch"}
  both = [t for t in torch_ok if t["batch"] in plain]
  ref = max(both, key=lambda t: t["batch"], default=None)
  speedup = ref and plain[ref["batch"]]["pairs_per_s"] / ref["pairs_per_s"]
  ladder = next((l for l in lines if l["gpu_check"] == "ladder"), {})
  return {"gpu_check": "summary", "device": ladder.get("device"),
          "largest_batch": ladder.get("largest_batch"),
          "best_mfu": best and best["mfu"],
          "best_mfu_config": best and f"{best['config']} at batch {best['batch']}",
          "speedup_vs_torch": speedup, "speedup_batch": ref and ref["batch"],
          "goal_mfu": GOAL_MFU, "goal_speedup": GOAL_SPEEDUP,
          "mfu_goal_met": None if best is None else best["mfu"] >= GOAL_MFU,
          "speedup_goal_met": None if speedup is None else speedup >= GOAL_SPEEDUP,
          "results": len(jax_ok) + len(torch_ok),
          "errors": sum(1 for l in lines if l.get("error"))}


def _require_gpu() -> None:
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process only looks
  import jax  # pylint: disable=import-outside-toplevel
  platform = jax.devices()[0].platform
  if platform != "gpu":
    raise cli.UsageError(f"benchmarks.gpu_check needs a GPU that JAX can see and JAX sees "
                         f"only {platform}; run it on the GPU machine, or add --dry-run for "
                         "the CPU check with tiny models.")


def _parse(argv):
  p = cli.Parser(prog="python -m benchmarks.gpu_check",
                 usage_line="python -m benchmarks.gpu_check [--dry-run] [--out=FILE] "
                 "[--budget_s=S]")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="CPU, tiny models: the whole path in well under a minute")
  p.add_argument("--out", default="gpu_check.jsonl", help="the JSON lines also go here")
  p.add_argument("--budget_s", type=float, default=0,
                 help="wall-clock budget of the whole check (default 450 s on a GPU)")
  args = p.parse_args(argv)
  folder = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(folder):
    raise cli.UsageError(f"--out {args.out}: its folder {folder} does not exist; create it or "
                         "write elsewhere.")
  if args.budget_s and args.budget_s < 60:
    raise cli.UsageError(f"--budget_s {args.budget_s:g} is too short to compile and time "
                         "anything; give at least 60.")
  return args


def _check(argv) -> None:
  start, args = time.monotonic(), _parse(argv)
  base_env = dict(os.environ)
  name = "dry" if args.dry_run else "gpu"
  plan = PLANS[name]
  if not args.dry_run:
    _require_gpu()
  budget = args.budget_s or plan.budget_s
  lines, out = [], None

  def on_line(line):
    nonlocal out
    if out is None:  # created with the first line: a refused run leaves no file
      out = open(args.out, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    lines.append(line)
    print(json.dumps(line), flush=True)
    out.write(json.dumps(line) + "\n")
    out.flush()

  wheels = wheel_paths(os.path.join(ROOT, WHEELS))
  env = worker_env(base_env, args.dry_run, wheels)
  jax_budget = JAX_SHARE * budget
  error = run_worker([sys.executable, "-m", "benchmarks.gpu_check_jax", name, str(jax_budget)],
                     env, jax_budget + GRACE_S, "jax", on_line)
  if error:
    on_line({"gpu_check": "jax", "error": error})
  ladder = next((l for l in lines if l["gpu_check"] == "ladder"), {})
  batches = sorted(ladder.get("batches") or [plan.ladder[plan.probe]], reverse=True)
  torch_budget = budget - (time.monotonic() - start)
  if torch_budget < MIN_TORCH_S:
    error = f"skipped: {torch_budget:.0f} s of the budget were left"
  else:  # its own deadline stops the timed steps; the rest is start-up and warm-up
    error = run_worker([sys.executable, "-m", "benchmarks.gpu_check", "--_torch_worker", name,
                        str(0.75 * torch_budget)] + [str(b) for b in batches],
                       env, torch_budget, "torch", on_line)
  if error:
    on_line({"gpu_check": "torch", "error": error})
  on_line(dict(summarize(lines), out=os.path.abspath(args.out),
               wheels=[os.path.basename(w) for w in wheels],
               wall_s=time.monotonic() - start))
  out.close()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--_torch_worker"]:  # PLAN BUDGET_S BATCH...
    emit = lambda line: print(json.dumps(line), flush=True)  # noqa: E731
    run_torch(PLANS[argv[1]], [int(b) for b in argv[3:]], float(argv[2]), emit)
    return 0
  return cli.run_main(_check, argv)


if __name__ == "__main__":
  sys.exit(main())
