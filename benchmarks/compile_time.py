"""Compile time of the train step against tower depth.

python -m benchmarks.compile_time --pairs=ViT-B-16:TinyCLIP-ViT-39M-16-Text-19M,L14:L14-student

Prints one JSON line per (teacher, student, scan_layers): seconds to trace + lower
and to compile the whole step (teacher forward, student forward/backward, affinity
loss, AdamW) as training jits it. Nothing big is materialized: the step is lowered
from abstract parameters and state (jax.eval_shape), so an L/14 teacher costs no
memory. Besides zoo names, a pair may name `depth:N` — a B/16-shaped teacher and a
39M/16-shaped student with N layers in every tower — to draw the curve in depth.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _depth(n: int):
  """(teacher, student) B/16 and 39M/16 shapes with n layers in all four towers."""
  from tinyclip_jax.models import zoo  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models.config import text_tower, vision_tower  # pylint: disable=import-outside-toplevel
  t, s = zoo.get("ViT-B-16"), zoo.get("TinyCLIP-ViT-39M-16-Text-19M")
  return (t.replace(vision=vision_tower(768, n, 16), text=text_tower(512, n, heads=8)),
          s.replace(vision=vision_tower(512, n, 16), text=text_tower(512, n, heads=8)))


def _l14_student():
  """A student for ViT-L/14 cut as 39M/16 is cut from B/16: the teacher's depth and
  patch, two thirds of its vision width, a 512-wide text tower of half its depth."""
  from tinyclip_jax.models import zoo  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models.config import text_tower, vision_tower  # pylint: disable=import-outside-toplevel
  return zoo.get("ViT-L-14").replace(vision=vision_tower(640, 24, 14),
                                     text=text_tower(512, 6, heads=8))


def model_pair(spec: str):
  """'TEACHER:STUDENT' (zoo names; 'L14-student' for _l14_student) or 'depth:N'."""
  from tinyclip_jax.models import zoo  # pylint: disable=import-outside-toplevel
  teacher, student = spec.split(":")
  if teacher == "depth":
    return _depth(int(student))
  return zoo.get(teacher), (_l14_student() if student == "L14-student" else zoo.get(student))


def compile_seconds(teacher_cfg, student_cfg, batch: int, precision: str,
                    scan_layers: bool) -> dict:
  """{lower_s, compile_s, compile_cpu_s} of the step train/compile.py compiles, from
  shapes only (no weights are made: an L/14 teacher would not fit this machine's
  memory twice), so the step is built here from the same parts."""
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import parallel  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models import CLIP, param_shapes  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.models.precision import policy_for  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import compile as compile_lib, defaults, state as state_lib  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train.step import LossSettings, make_train_step  # pylint: disable=import-outside-toplevel
  c = defaults.base_config()
  c.batch_size = batch
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  pol = policy_for(precision, jax.devices()[0].platform)
  tx = state_lib.make_optimizer(c.optimizer, c.total_steps, 3, model_config=student_cfg)
  state = jax.eval_shape(lambda p: state_lib.init_state(p, tx), param_shapes(student_cfg))
  teacher_params = param_shapes(teacher_cfg)
  step = make_train_step(CLIP(student_cfg, scan_layers=scan_layers, **pol.student_kw),
                         CLIP(teacher_cfg, scan_layers=scan_layers, **pol.teacher_kw),
                         LossSettings.from_config(c.loss), mesh, tx, state_lib.learning_rate_fn(c.optimizer, c.total_steps),
                         batch)
  batch_abs = compile_lib.batch_abstract(c, student_cfg, mesh)
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = jax.jit(step, donate_argnums=(0,)).lower(state, teacher_params, batch_abs)
  t1, c1 = time.perf_counter(), time.process_time()
  lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  # CPU seconds beside wall seconds: on a shared machine they move less with the load.
  return {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
          "compile_cpu_s": round(c2 - c1, 2)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", default="depth:2,depth:6,ViT-B-16:TinyCLIP-ViT-39M-16-Text-19M,"
                                    "ViT-L-14:L14-student")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
  p.add_argument("--scan", default="off,on", help="'off', 'on' or 'off,on'")
  args = p.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  for spec in args.pairs.split(","):
    teacher, student = model_pair(spec)
    for scan in args.scan.split(","):
      out = compile_seconds(teacher, student, args.batch, args.precision, scan == "on")
      print(json.dumps({"benchmark": "compile_time", "pair": spec, "scan_layers": scan == "on",
                        "teacher_layers": [teacher.vision.layers, teacher.text.layers],
                        "student_layers": [student.vision.layers, student.text.layers],
                        "batch": args.batch, "precision": args.precision,
                        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                        "load_avg_1min": round(os.getloadavg()[0], 1), **out}), flush=True)


if __name__ == "__main__":
  main()
