"""Distillation train-step throughput, JAX against the same math in PyTorch.

python -m benchmarks.train_step --student=TinyCLIP-ViT-39M-16-Text-19M --teacher=ViT-B-16 \
    --batch=8 --image=224 --steps=10

Prints one JSON line, with model FLOPs utilization (`mfu`) against the device's peak
(benchmarks/peak.py: a table for TPUs and NVIDIA GPUs; a measured matmul on CPU).
Both sides run one step = teacher forward (no grad), student forward + backward,
affinity-mimicking loss (τ=50), global-norm clip, AdamW update, on random weights and
random inputs. The PyTorch side uses transformers' CLIPModel
and runs in a subprocess, so each side's peak RSS is its own. The pieces (build,
compile, time) are also what benchmarks/gpu_check.py runs on an accelerator.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import peak


def peak_rss_mb() -> float:
  """This process's peak RSS. VmHWM, not getrusage: ru_maxrss survives fork+exec,
  so a subprocess would report its parent's peak."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_configs(student: str, teacher: str, image: int):
  """[student, teacher] zoo configs at `image` pixels."""
  from tinyclip_jax.models import zoo  # pylint: disable=import-outside-toplevel
  out = []
  for name in (student, teacher):
    c = zoo.get(name)
    if image != c.vision.image_size:
      c = c.replace(vision=dataclasses.replace(c.vision, image_size=image))
    out.append(c)
  return out


def time_steps(run_one, steps: int, warmup: int, deadline: float | None = None) -> list[float]:
  """Seconds of each timed run_one() (which returns when the device is done) after
  `warmup` untimed ones; past `deadline` (time.monotonic()) it stops once one is timed."""
  times = []
  for i in range(steps + warmup):
    t = time.perf_counter()
    run_one()
    if i >= warmup:
      times.append(time.perf_counter() - t)
    if deadline is not None and times and time.monotonic() > deadline:
      break
  return times


def random_tokens(rng, batch: int, text_cfg) -> np.ndarray:
  """Random ids below the end-of-text id (the vocabulary's last), which ends every row
  at position 20."""
  eot = text_cfg.vocab_size - 1
  tokens = rng.integers(1, eot, (batch, text_cfg.context_length)).astype(np.int32)
  tokens[:, min(20, text_cfg.context_length - 1)] = eot
  return tokens


# ------------------------------------------------------------------------------ JAX


def build_jax(student_cfg, teacher_cfg, batch: int, precision: str, microbatch: int = 0):
  """(config, setup, initial state) as training builds them: a random teacher, the
  student inherited from it."""
  from tinyclip_jax.train import defaults, prepare  # pylint: disable=import-outside-toplevel
  c = defaults.base_config()
  c.batch_size, c.total_steps, c.precision = batch, 1000, precision
  c.optimizer.warmup_steps = 10
  c.microbatch_size = microbatch
  c.text_buckets = ()  # steps are compiled for a given text length here (compile_step)
  setup, state = prepare.build(c, restoring=False, model_configs=(teacher_cfg, student_cfg))
  return c, setup, state


@dataclasses.dataclass
class CompiledStep:
  """One jitted step for one batch size. `memory_mb`: the executable's own account
  (arguments + outputs + temporaries − aliased), None where the backend gives none."""
  executable: object
  batch_abstract: dict
  teacher_params: object
  compile_s: float
  memory_mb: float | None


def compile_step(c, setup, batch: int, remat: bool = False, cached: bool = False,
                 text_length: int = 0) -> CompiledStep:
  """The step as training compiles it (state donated); `cached`: the teacher's embeddings
  come with the batch (teacher.cache) instead of from a teacher forward; `text_length`:
  the tokens' bucket (0 = the context length)."""
  from tinyclip_jax.train import compile as compile_lib  # pylint: disable=import-outside-toplevel
  c = c.copy_and_resolve_references()
  c.batch_size = batch
  dim = setup.teacher_config.embed_dim if cached else 0
  batch_abs = compile_lib.batch_abstract(c, setup.student_config, setup.mesh, dim, text_length)
  teacher_params = None if cached else setup.teacher_params
  t0 = time.time()
  # No pre-flight refusal here: the benchmarks look for the largest batch that fits.
  compiled = compile_lib.compile_train_steps(c, setup, {0: batch_abs}, preflight_check=False,
                                             remat=remat, cached=cached, batch_size=batch)[0]
  compile_s = time.time() - t0
  memory_mb = compile_lib.memory_mb(compiled)
  return CompiledStep(compiled, batch_abs, teacher_params, compile_s, memory_mb)


def random_batch(batch_abs: dict, text_cfg, seed: int = 0) -> dict:
  """Random images and tokens, and unit teacher embeddings where the step reads them;
  on device with the step's shardings."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  batch = {"images": rng.standard_normal(batch_abs["images"].shape, np.float32),
           "tokens": random_tokens(rng, batch_abs["tokens"].shape[0], text_cfg)}
  for k in ("teacher_image", "teacher_text"):
    if k in batch_abs:
      e = rng.standard_normal(batch_abs[k].shape).astype(np.float32)
      batch[k] = e / np.linalg.norm(e, axis=-1, keepdims=True)
  return {k: jax.device_put(v, batch_abs[k].sharding) for k, v in batch.items()}


def time_jax(step: CompiledStep, state, batch: dict, steps: int, warmup: int,
             deadline: float | None = None):
  """(step times, last loss, state after) of `step` run from `state` (donated)."""
  import jax  # pylint: disable=import-outside-toplevel
  box = {"state": state}

  def run_one():
    box["state"], m = step.executable(box["state"], step.teacher_params, batch)
    box["loss"] = float(jax.block_until_ready(m["loss"]))
  times = time_steps(run_one, steps, warmup, deadline)
  return times, box["loss"], box["state"]


def flops_per_pair(setup, cached: bool = False) -> float:
  """Model FLOPs per pair (prepare.model_flops_per_pair); with the teacher's embeddings
  cached its forward is not part of the step, so only the student's count."""
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  return prepare.model_flops_per_pair(setup.student_config,
                                      None if cached else setup.teacher_config)


def run_jax(args, cached: bool = False) -> dict:
  """The step as training compiles it; `cached`: teacher embeddings come with the batch
  (teacher.cache) instead of a teacher forward."""
  import jax  # pylint: disable=import-outside-toplevel
  student_cfg, teacher_cfg = model_configs(args.student, args.teacher, args.image)
  c, setup, state = build_jax(student_cfg, teacher_cfg, args.batch, args.precision,
                              args.microbatch)
  step = compile_step(c, setup, args.batch, args.remat, cached)
  batch = random_batch(step.batch_abstract, setup.student_config.text)
  times, loss, state = time_jax(step, state, batch, args.steps, args.warmup)
  step_s = statistics.median(times)
  flops = flops_per_pair(setup) * args.batch  # the uncached step's, as before
  compile_s, compiled_mb = step.compile_s, step.memory_mb
  del state, step  # the peak measurement below should not compete for memory
  return {"step_s": step_s, "pairs_per_s": args.batch / step_s, "compile_s": compile_s,
          "peak_rss_mb": peak_rss_mb(), "compiled_memory_mb": compiled_mb,
          "model_flops_per_s": flops / step_s, **peak.mfu(flops / step_s, args.precision),
          "loss": loss, "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "load_avg_1min": os.getloadavg()[0]}


def run_remat_compare(args) -> dict:
  """The step with and without remat, compiled from one setup and run in turns on one
  state (each step's output state feeds the other's next step), so that a change in
  the machine's load falls on both alike."""
  import jax  # pylint: disable=import-outside-toplevel
  student_cfg, teacher_cfg = model_configs(args.student, args.teacher, args.image)
  c, setup, state = build_jax(student_cfg, teacher_cfg, args.batch, args.precision,
                              args.microbatch)
  steps = {r: compile_step(c, setup, args.batch, remat=r) for r in (False, True)}
  batch = random_batch(steps[False].batch_abstract, setup.student_config.text)
  times = {False: [], True: []}
  for i in range(args.warmup + args.steps):
    for r, step in steps.items():
      t = time.perf_counter()
      state, m = step.executable(state, step.teacher_params, batch)
      jax.block_until_ready(m["loss"])
      if i >= args.warmup:
        times[r].append(time.perf_counter() - t)
  out = {"remat_compare": True, "load_avg_1min": os.getloadavg()[0]}
  for r, name in ((False, "plain"), (True, "remat")):
    step_s = statistics.median(times[r])
    out.update({f"{name}_step_s": step_s, f"{name}_pairs_per_s": args.batch / step_s,
                f"{name}_compile_s": steps[r].compile_s,
                f"{name}_compiled_memory_mb": steps[r].memory_mb})
  out["remat_speed_ratio"] = out["remat_pairs_per_s"] / out["plain_pairs_per_s"]
  if out["plain_compiled_memory_mb"]:
    out["remat_memory_ratio"] = out["remat_compiled_memory_mb"] / out["plain_compiled_memory_mb"]
  return out


# -------------------------------------------------------------------------- PyTorch


def torch_step(student_cfg, teacher_cfg, batch: int, device: str = "cpu",
               autocast: str | None = None):
  """run_one() of the same step in PyTorch (transformers' CLIPModel, SDPA attention),
  float32 weights; `autocast` ("bfloat16") runs the math in that dtype."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.convert.hf import hf_config_dict  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  build = lambda c: transformers.CLIPModel(transformers.CLIPConfig(
      **hf_config_dict(c), attn_implementation="sdpa")).to(device)
  student, teacher = build(student_cfg).train(), build(teacher_cfg).eval()
  opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.2, fused=True if device == "cuda" else None)
  rng = np.random.default_rng(0)
  s = student_cfg.vision.image_size
  images = torch.from_numpy(rng.standard_normal((batch, 3, s, s), np.float32)).to(device)
  tokens = torch.from_numpy(random_tokens(rng, batch, student_cfg.text)).long().to(device)
  amp = (torch.autocast(device, dtype=getattr(torch, autocast)) if autocast else
         contextlib.nullcontext())

  def embeds(model):
    i = model.get_image_features(pixel_values=images)
    t = model.get_text_features(input_ids=tokens)
    i = getattr(i, "pooler_output", i)
    t = getattr(t, "pooler_output", t)
    return i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)

  def soft_ce(logits, target):
    return -(target.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()

  def run_one():
    with amp:
      with torch.no_grad():
        ti, tt = embeds(teacher)
      si, st = embeds(student)
      loss = 0.5 * (soft_ce(50 * si @ st.T, 50 * ti @ tt.T) +
                    soft_ce(50 * st @ si.T, 50 * tt @ ti.T))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
  return run_one


def run_torch(args) -> dict:
  """The same step in PyTorch (transformers CLIPModel), float32, on the CPU."""
  import torch  # pylint: disable=import-outside-toplevel
  student_cfg, teacher_cfg = model_configs(args.student, args.teacher, args.image)
  times = time_steps(torch_step(student_cfg, teacher_cfg, args.batch), args.steps, args.warmup)
  step_s = statistics.median(times)
  return {"step_s": step_s, "pairs_per_s": args.batch / step_s, "peak_rss_mb": peak_rss_mb(),
          "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.train_step")
  p.add_argument("--student", default="TinyCLIP-ViT-39M-16-Text-19M")
  p.add_argument("--teacher", default="ViT-B-16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", action="store_true")
  p.add_argument("--microbatch", type=int, default=0,
                 help="microbatch_size (gradient caching); 0 = one pass")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
  p.add_argument("--teacher_cache", action="store_true",
                 help="also time the step reading cached teacher embeddings "
                 "(teacher.cache) and report the speed-up over running the teacher")
  p.add_argument("--remat_compare", action="store_true",
                 help="only JAX: the step with and without remat, compiled from one setup "
                 "and run in turns; compiled memory and pairs/s of both")
  p.add_argument("--_torch_worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._torch_worker:
    print(json.dumps(run_torch(args)))
    return 0
  result = {"benchmark": "train_step", "student": args.student, "teacher": args.teacher,
            "batch": args.batch, "image": args.image, "precision": args.precision,
            "microbatch": args.microbatch}
  if args.remat_compare:
    print(json.dumps({**result, **run_remat_compare(args)}))
    return 0
  result.update(run_jax(args))
  if args.teacher_cache:
    cached = run_jax(args, cached=True)
    result.update({f"cached_{k}": cached[k] for k in ("step_s", "pairs_per_s", "compile_s")})
    result["cache_speedup"] = cached["pairs_per_s"] / result["pairs_per_s"]
  if not args.no_torch:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--_torch_worker"] + [
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--teacher_cache"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ref = json.loads(out.strip().splitlines()[-1])
    result.update({f"torch_{k}": v for k, v in ref.items()})
    result["speedup_vs_torch"] = result["pairs_per_s"] / ref["pairs_per_s"]
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
