"""The embedded demo: the whole method on a 2-core CPU with data the package makes.

1. train a small teacher CLIP from scratch on generated image–caption pairs;
2. distil a smaller student from it (manual weight inheritance + affinity mimicking);
3. train the same student from scratch with the plain CLIP loss (the control):
   same steps, data, optimizer and evaluation;
4. evaluate all three zero-shot; write DIR/summary.json, DIR/top1.png and the final
   Flax checkpoints DIR/teacher, DIR/distilled, DIR/scratch.

With demo.auto (configs/demo_auto.py) it runs automatic weight inheritance instead:
the teacher-sized student learns structure masks while distilling, is pruned at
masks.prune_step and distilled on; the result joins DIR/summary.json as "auto",
reusing DIR/teacher when the demo already made one.

Run: python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
     python -m tinyclip_jax.main --config=configs/demo_auto.py --workdir=/tmp/demo
"""
from __future__ import annotations

import copy
import os
import shutil
import time

import ml_collections
from absl import logging

from tinyclip_jax import paths, storage, workdir as workdir_lib
from tinyclip_jax.inherit import prune
from tinyclip_jax.models import count_params
from tinyclip_jax.train import loop, prepare


# Training without a teacher is plain CLIP: its contrastive loss with the learned
# temperature starting at 1/0.07, as CLIP trains (the distilled student keeps τ=50).
_CLIP_LOSS = {"loss.alpha": 0.0, "loss.learn_scale": True, "loss.student_scale": 1 / 0.07}


def _stage(config, workdir: str, name: str, **overrides) -> dict:
  """One training run in DIR/runs/NAME; its export moves to DIR/NAME."""
  c = copy.deepcopy(config)
  with c.unlocked():
    del c["demo"]
    c.stages = ()
    for key, value in overrides.items():
      target = c
      *path, leaf = key.split(".")
      for p in path:
        target = target[p]
      target[leaf] = value
  run_dir = workdir_lib.demo_run(workdir, name)
  t0 = time.time()
  result = loop.run(c, run_dir)
  dst = os.path.join(workdir, name)
  if os.path.exists(dst):
    shutil.rmtree(dst)
  os.replace(workdir_lib.final(run_dir), dst)  # the demo runs on local disk
  result["seconds"] = time.time() - t0
  result["checkpoint"] = dst
  logging.info("%s: %d steps in %.0f s", name, result["step"], result["seconds"])
  return result


def _final(result: dict) -> dict:
  """The run's own evaluation at its last step (the loop always evaluates there)."""
  ev = result["evals"][-1]
  assert ev["step"] == result["step"], (ev["step"], result["step"])
  return {"top1": ev["top1"], "top5": ev["top5"], "params": count_params(result["params"])}


def reached_at(history: list[dict], target: float):
  """First evaluated step whose top-1 reached `target`, or None."""
  return next((h["step"] for h in history if h["top1"] >= target), None)


def _plot(path: str, distilled: list[dict], scratch: list[dict], teacher_top1: float) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, hist in (("distilled (inherit + affinity)", distilled), ("scratch (CLIP loss)", scratch)):
    ax.plot([h["step"] for h in hist], [100 * h["top1"] for h in hist], marker="o", label=name)
  ax.axhline(100 * teacher_top1, color="gray", linestyle="--", label="teacher")
  ax.set_xlabel("training step")
  ax.set_ylabel("zero-shot top-1 (%)")
  ax.set_title("Student zero-shot accuracy on the generated eval split")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _teacher(config, workdir: str) -> dict:
  d = config.demo
  return _stage(config, workdir, "teacher", **{
      "teacher.model": "", "teacher.checkpoint": "", "teacher.custom.vision_width": 0,
      "student.custom": config.teacher.custom, "student.init": "scratch", **_CLIP_LOSS,
      "masks.enabled": False, "total_steps": d.teacher_steps, "optimizer.lr": d.teacher_lr})


def _print_table(summary: dict) -> None:
  print(f"\n{'model':<10} {'params':>10} {'top-1':>7} {'top-5':>7}")
  for name in ("teacher", "distilled", "scratch", "auto"):
    if name in summary:
      s = summary[name]
      print(f"{name:<10} {s['params']:>10,} {100 * s['top1']:>6.1f}% {100 * s['top5']:>6.1f}%")


def run_auto(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The auto path: masks → prune → distil on, from the demo's teacher."""
  path = workdir_lib.summary(workdir)
  summary = storage.read_json(path) if storage.exists(path) else {}
  if "teacher" in summary and os.path.exists(os.path.join(workdir, "teacher")):
    logging.info("reusing the demo's teacher in %s/teacher", workdir)
  else:
    summary["teacher"] = _final(_teacher(config, workdir))
    summary["teacher_steps"] = config.demo.teacher_steps
  auto = _stage(config, workdir, "auto", **{
      "teacher.checkpoint": os.path.join(workdir, "teacher"), "student.init": "inherit"})
  summary["auto"] = _final(auto)
  summary["auto"].update(steps=config.total_steps, prune_step=config.masks.prune_step,
                         target_sparsity=config.masks.target_sparsity,
                         structure=prune.structure(auto["student_config"]))
  summary.setdefault("seconds", {})["auto"] = round(auto["seconds"], 1)
  summary.setdefault("history", {})["auto"] = auto["evals"]
  storage.write_json(path, summary)
  _print_table(summary)
  print(f"auto: masks learned for {config.masks.prune_step} steps, pruned, distilled to step "
        f"{config.total_steps}; structure plots in {workdir}/runs/auto/structure")
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  d = config.demo
  if config.eval.kind != "synthetic":
    raise prepare.SetupError(f"eval.kind {config.eval.kind!r}: the demo compares its models on "
                             "the generated zero-shot split; leave eval.kind='synthetic'.")
  prepare.validate(config)  # before the teacher trains for minutes
  os.makedirs(workdir, exist_ok=True)
  if d.get("auto"):
    return run_auto(config, workdir)
  teacher = _teacher(config, workdir)
  distilled = _stage(config, workdir, "distilled", **{
      "teacher.checkpoint": teacher["checkpoint"], "student.init": "inherit"})
  scratch = _stage(config, workdir, "scratch", **{
      "teacher.model": "", "teacher.checkpoint": "", "teacher.custom.vision_width": 0,
      "student.init": "scratch", **_CLIP_LOSS})

  summary = {name: _final(r)
             for name, r in (("teacher", teacher), ("distilled", distilled), ("scratch", scratch))}
  old = workdir_lib.summary(workdir)
  if storage.exists(old):  # keep an auto result from configs/demo_auto.py
    previous = storage.read_json(old)
    if "auto" in previous:
      summary["auto"] = previous["auto"]
  summary["steps"] = config.total_steps
  summary["teacher_steps"] = d.teacher_steps
  summary["distilled_reached_scratch_at"] = reached_at(distilled["evals"],
                                                       summary["scratch"]["top1"])
  summary["history"] = {"distilled": distilled["evals"], "scratch": scratch["evals"]}
  summary["seconds"] = {k: round(r["seconds"], 1) for k, r in
                        (("teacher", teacher), ("distilled", distilled), ("scratch", scratch))}
  storage.write_json(workdir_lib.summary(workdir), summary)
  _plot(workdir_lib.plot(workdir, "top1.png"), distilled["evals"], scratch["evals"],
        summary["teacher"]["top1"])

  _print_table(summary)
  print(f"students trained {config.total_steps} steps each; distilled reached scratch's final "
        f"top-1 at step {summary['distilled_reached_scratch_at']}")
  print(f"wrote {workdir}/summary.json, {workdir}/top1.png and checkpoints "
        f"{workdir}/teacher, {workdir}/distilled, {workdir}/scratch")
  return summary
