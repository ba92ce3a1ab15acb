"""Length-bucketed text towers (text_buckets): time per bucket, and what a realistic
caption-length distribution gains.

python -m benchmarks.text_buckets --student=TinyCLIP-ViT-39M-16-Text-19M --teacher=ViT-B-16 \
    --batch=8 --image=224 --rounds=3 --text_reps=5

Caption lengths (tokens, start- and end-of-text included) are modelled CC3M-like:
log-normal with median `--median` (10) and σ `--sigma` (0.5) in log space, rounded and
clipped to [3, context] — 99% of captions within 32 tokens, 1 in 1,000 beyond 47, the
tail to 77. A batch runs at the smallest bucket that holds its longest caption, so at
global batch B the bucket is ≤ b with probability F(b)^B (F the length CDF, exact here).

For each bucket it times (JAX, the step as training compiles it, random weights as
benchmarks/train_step.py builds them): the text towers alone (teacher forward +
student forward and backward) and the whole step, in wall seconds and in CPU seconds
of the process (all its threads: on a shared machine the work, where wall time also
counts the other jobs). Buckets take turns round by round, so load changes fall on
all alike. "Without" is the context length's bucket (every batch at 77 tokens);
"with" is the expectation over the bucket distribution at --batch, Σ_b P(b)·t(b),
from the per-bucket medians. One JSON line per bucket, then a summary line, then one
line per --mix_batches global batch with its bucket distribution (no timing: it
shows how the gain shrinks as batches grow).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from benchmarks import train_step as ts


def length_cdf(n: int, median: float, sigma: float, context: int) -> float:
  """P(caption length ≤ n) for round(LogNormal(ln median, sigma)) clipped to [3, context]."""
  if n >= context:
    return 1.0
  if n < 3:
    return 0.0
  z = (math.log(n + 0.5) - math.log(median)) / sigma
  return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def bucket_probs(buckets, batch: int, median: float, sigma: float) -> dict[int, float]:
  """P(a global batch of `batch` captions runs at each bucket)."""
  out, below = {}, 0.0
  for b in buckets:
    at_most = length_cdf(b, median, sigma, buckets[-1]) ** batch
    out[b], below = at_most - below, at_most
  return out


def tokens_for(batch: int, length: int, eot: int = 49407) -> np.ndarray:
  """Rows whose end-of-text falls at the bucket's last position (the content does not
  change the time)."""
  rng = np.random.default_rng(0)
  t = rng.integers(1, eot, (batch, length)).astype(np.int32)
  t[:, 0], t[:, -1] = 49406, eot
  return t


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process, all its threads) of fn()."""
  w, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w, time.process_time() - c


def text_towers(setup, batch: int, length: int):
  """run_one() of the teacher's text forward plus the student's text forward and
  backward (w.r.t. the text tower's weights) on `batch` rows of `length` tokens."""
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP  # pylint: disable=import-outside-toplevel
  student = CLIP(setup.student_config, dtype=setup.dtype)
  teacher = CLIP(setup.teacher_config, dtype=setup.dtype)

  def fn(params, teacher_params, tokens):
    t = teacher.apply({"params": teacher_params}, tokens, method=CLIP.encode_text)

    def loss(text):  # a scalar of both towers' outputs (any embedding widths)
      s = student.apply({"params": dict(params, text=text)}, tokens, method=CLIP.encode_text)
      return (s.sum(axis=-1) * t.sum(axis=-1)).sum()
    return jax.grad(loss)(params["text"])
  run = jax.jit(fn)
  tokens = jax.device_put(tokens_for(batch, length))
  return lambda state: jax.block_until_ready(run(state.params, setup.teacher_params, tokens))


def whole_step(c, setup, batch: int, length: int):
  """(run_one(state) -> state, compile seconds) of the step at this bucket."""
  import jax  # pylint: disable=import-outside-toplevel
  step = ts.compile_step(c, setup, batch, text_length=length)
  rng = np.random.default_rng(0)
  host = {"images": rng.standard_normal(step.batch_abstract["images"].shape, np.float32),
          "tokens": tokens_for(batch, length)}
  b = {k: jax.device_put(v, step.batch_abstract[k].sharding) for k, v in host.items()}

  def run_one(state):
    state, m = step.executable(state, step.teacher_params, b)
    jax.block_until_ready(m["loss"])
    return state
  return run_one, step.compile_s


def measure(c, setup, state, buckets, batch: int, rounds: int, text_reps: int) -> dict:
  """Per bucket: median wall and CPU seconds of the text towers and of the whole step.
  Everything is compiled (and run once) first; then each round times every bucket in
  turn, so that a change in the machine's load falls on all buckets alike."""
  text = {n: text_towers(setup, batch, n) for n in buckets}
  steps, compile_s = {}, {}
  for n in buckets:
    steps[n], compile_s[n] = whole_step(c, setup, batch, n)
    text[n](state)
    state = steps[n](state)  # warm-up
  times = {n: {"text": [], "step": []} for n in buckets}
  box = {"state": state}

  def step_once(n):
    box["state"] = steps[n](box["state"])
  for _ in range(rounds):
    for n in buckets:
      for _ in range(text_reps):
        times[n]["text"].append(_timed(lambda n=n: text[n](box["state"])))
      times[n]["step"].append(_timed(lambda n=n: step_once(n)))
  out = {}
  for n in buckets:
    out[n] = {"compile_s": compile_s[n]}
    for what in ("text", "step"):
      wall, cpu = zip(*times[n][what])
      out[n][f"{what}_s"], out[n][f"{what}_cpu_s"] = statistics.median(wall), statistics.median(cpu)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.text_buckets")
  p.add_argument("--student", default="TinyCLIP-ViT-39M-16-Text-19M")
  p.add_argument("--teacher", default="ViT-B-16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--buckets", default="16,24,32,48,77")
  p.add_argument("--rounds", type=int, default=3, help="timed steps per bucket")
  p.add_argument("--text_reps", type=int, default=5, help="timed text-tower runs per round")
  p.add_argument("--median", type=float, default=10.0)
  p.add_argument("--sigma", type=float, default=0.5)
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--mix_batches", default="8,64,256,1024,4096")
  args = p.parse_args(argv)
  buckets = tuple(int(b) for b in args.buckets.split(","))
  student_cfg, teacher_cfg = ts.model_configs(args.student, args.teacher, args.image)
  if buckets[-1] != student_cfg.text.context_length:
    print(f"error: --buckets must end with the context length "
          f"{student_cfg.text.context_length}.", file=sys.stderr)
    return 2
  c, setup, state = ts.build_jax(student_cfg, teacher_cfg, args.batch, args.precision)
  probs = bucket_probs(buckets, args.batch, args.median, args.sigma)
  per = measure(c, setup, state, buckets, args.batch, args.rounds, args.text_reps)
  for n in buckets:
    print(json.dumps({"benchmark": "text_buckets", "bucket": n, "probability": probs[n],
                      **per[n]}), flush=True)
  result = {"benchmark": "text_buckets", "student": args.student, "teacher": args.teacher,
            "batch": args.batch, "image": args.image, "precision": args.precision,
            "lengths": {"median": args.median, "sigma": args.sigma, "clip": [3, buckets[-1]]},
            "bucket_probability": probs,
            "expected_text_tokens": sum(probs[n] * n for n in buckets),
            "rounds": args.rounds, "load_avg_1min": os.getloadavg()[0]}
  full = per[buckets[-1]]
  for unit in ("s", "cpu_s"):  # without: every batch at the context length
    text_with = sum(probs[n] * per[n][f"text_{unit}"] for n in buckets)
    step_with = sum(probs[n] * per[n][f"step_{unit}"] for n in buckets)
    result.update({f"text_towers_{unit}_without": full[f"text_{unit}"],
                   f"text_towers_{unit}_with": text_with,
                   f"step_{unit}_without": full[f"step_{unit}"], f"step_{unit}_with": step_with})
    per_s, tag = ("pairs_per_s", "") if unit == "s" else ("pairs_per_cpu_s", "_cpu")
    result.update({f"{per_s}_without": args.batch / full[f"step_{unit}"],
                   f"{per_s}_with": args.batch / step_with,
                   f"text_speedup{tag}": full[f"text_{unit}"] / text_with,
                   f"step_speedup{tag}": full[f"step_{unit}"] / step_with})
  print(json.dumps(result), flush=True)
  for b in (int(x) for x in args.mix_batches.split(",")):
    pr = bucket_probs(buckets, b, args.median, args.sigma)
    print(json.dumps({"benchmark": "text_buckets", "mix_batch": b, "bucket_probability": pr,
                      "expected_text_tokens": sum(pr[n] * n for n in buckets)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
