"""Distillation train-step throughput, JAX against the same math in PyTorch.

python -m benchmarks.train_step --student=TinyCLIP-ViT-39M-16-Text-19M --teacher=ViT-B-16 \
    --batch=8 --image=224 --steps=10

Prints one JSON line, with model FLOPs utilization (`mfu`) against the device's peak
(benchmarks/peak.py: a table for TPUs, A100 and H100; a measured matmul on CPU).
Both sides run one step = teacher forward (no grad), student forward + backward,
affinity-mimicking loss (τ=50), global-norm clip, AdamW update, on random weights and
random inputs. The PyTorch side uses transformers' CLIPModel
and runs in a subprocess, so each side's peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import peak


def _peak_rss_mb() -> float:
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


def _configs(args):
  from tinyclip_jax.models import zoo  # pylint: disable=import-outside-toplevel
  out = []
  for name in (args.student, args.teacher):
    c = zoo.get(name)
    if args.image != c.vision.image_size:
      import dataclasses  # pylint: disable=import-outside-toplevel
      c = c.replace(vision=dataclasses.replace(c.vision, image_size=args.image))
    out.append(c)
  return out


def run_jax(args, cached: bool = False) -> dict:
  """The step as training compiles it; `cached`: teacher embeddings come with the batch
  (teacher.cache) instead of a teacher forward."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import defaults, prepare  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train.step import make_train_step  # pylint: disable=import-outside-toplevel

  student_cfg, teacher_cfg = _configs(args)
  c = defaults.base_config()
  c.teacher.model, c.student.model = args.teacher, args.student
  c.batch_size, c.total_steps, c.precision, c.remat = args.batch, 1000, args.precision, args.remat
  c.optimizer.warmup_steps = 10
  c.microbatch_size = args.microbatch
  setup, state = prepare.build(c, restoring=False, model_configs=(teacher_cfg, student_cfg))
  dim = setup.teacher_config.embed_dim if cached else 0
  batch_abs = prepare.batch_abstract(c, setup.student_config, setup.mesh, dim)
  teacher_params = None if cached else setup.teacher_params
  step = make_train_step(CLIP(setup.student_config, remat=c.remat, dtype=setup.dtype),
                         None if cached else CLIP(setup.teacher_config, dtype=setup.dtype),
                         c.loss, setup.mesh, setup.tx, setup.lr_fn, c.batch_size,
                         c.microbatch_size)
  t0 = time.time()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(
      setup.abstract_state, teacher_params, batch_abs).compile()
  compile_s = time.time() - t0
  try:  # the compiled executable's own account, where the backend gives one
    mem = compiled.memory_analysis()
    compiled_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
                   mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001
    compiled_mb = None
  rng = np.random.default_rng(0)
  batch = {"images": rng.standard_normal(batch_abs["images"].shape, np.float32),
           "tokens": rng.integers(1, 49407, batch_abs["tokens"].shape).astype(np.int32)}
  batch["tokens"][:, 20] = 49407
  for k in ("teacher_image", "teacher_text") if cached else ():
    e = rng.standard_normal(batch_abs[k].shape).astype(np.float32)
    batch[k] = e / np.linalg.norm(e, axis=-1, keepdims=True)
  batch = {k: jax.device_put(v, batch_abs[k].sharding) for k, v in batch.items()}
  times = []
  for i in range(args.steps + args.warmup):
    t = time.perf_counter()
    state, m = compiled(state, teacher_params, batch)
    jax.block_until_ready(m["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  flops = prepare.model_flops_per_pair(setup.student_config, setup.teacher_config) * args.batch
  del state, compiled  # the peak measurement below should not compete for memory
  return {"step_s": step_s, "pairs_per_s": args.batch / step_s, "compile_s": compile_s,
          "peak_rss_mb": _peak_rss_mb(), "compiled_memory_mb": compiled_mb,
          "model_flops_per_s": flops / step_s, **peak.mfu(flops / step_s, args.precision),
          "loss": float(m["loss"]), "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "load_avg_1min": os.getloadavg()[0]}


def run_torch(args) -> dict:
  """The same step in PyTorch (transformers CLIPModel), float32."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.convert.hf import hf_config_dict  # pylint: disable=import-outside-toplevel

  student_cfg, teacher_cfg = _configs(args)
  torch.manual_seed(0)
  build = lambda c: transformers.CLIPModel(transformers.CLIPConfig(**hf_config_dict(c)))
  student, teacher = build(student_cfg).train(), build(teacher_cfg).eval()
  opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.2)
  b, s = args.batch, args.image
  images = torch.randn(b, 3, s, s)
  tokens = torch.randint(1, 49407, (b, student_cfg.text.context_length))
  tokens[:, 20] = 49407

  def embeds(model):
    i = model.get_image_features(pixel_values=images)
    t = model.get_text_features(input_ids=tokens)
    i = getattr(i, "pooler_output", i)
    t = getattr(t, "pooler_output", t)
    return i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)

  def soft_ce(logits, target):
    return -(target.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()

  times = []
  for i in range(args.steps + args.warmup):
    t0 = time.perf_counter()
    with torch.no_grad():
      ti, tt = embeds(teacher)
    si, st = embeds(student)
    loss = 0.5 * (soft_ce(50 * si @ st.T, 50 * ti @ tt.T) + soft_ce(50 * st @ si.T, 50 * tt @ ti.T))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
    opt.step()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return {"step_s": step_s, "pairs_per_s": b / step_s, "peak_rss_mb": _peak_rss_mb(),
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
  p.add_argument("--_torch_worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._torch_worker:
    print(json.dumps(run_torch(args)))
    return 0
  result = {"benchmark": "train_step", "student": args.student, "teacher": args.teacher,
            "batch": args.batch, "image": args.image, "precision": args.precision,
            "microbatch": args.microbatch}
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
