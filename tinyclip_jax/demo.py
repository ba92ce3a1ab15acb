"""The embedded demo: the whole method on a 2-core CPU with data the package makes.

It is a plan of stages (train/plan.py), run by the same runner as every training run:

1. `teacher`: a small CLIP trained from scratch on generated image–caption pairs;
2. `distilled`: a smaller student distilled from it (manual weight inheritance +
   affinity mimicking), the teacher held in memory from stage 1;
3. `scratch`: the same student trained from scratch with the plain CLIP loss (the
   control): same steps, data, optimizer and evaluation;
then DIR/summary.json and DIR/top1.png from the stages' evaluations. Each stage's
student is exported to DIR/<k>_<name>/final.

With demo.auto (configs/demo_auto.py) the plan is the teacher (skipped when DIR holds
the demo's finished teacher stage) and `auto`: the teacher-sized student learns
structure masks while distilling, is pruned at masks.prune_step and distilled on.

Run: python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
     python -m tinyclip_jax.main --config=configs/demo_auto.py --workdir=/tmp/demo
"""
from __future__ import annotations

import copy
import io
import time

import ml_collections
from absl import logging

from tinyclip_jax import paths, storage, workdir as workdir_lib
from tinyclip_jax.inherit import prune
from tinyclip_jax.models import CLIPConfig, count_params, param_shapes
from tinyclip_jax.train import plan as plan_lib, prepare, runner


# Training without a teacher is plain CLIP: its contrastive loss with the learned
# temperature starting at 1/0.07, as CLIP trains (the distilled student keeps τ=50).
_CLIP_LOSS = {"alpha": 0.0, "learn_scale": True, "student_scale": 1 / 0.07}
_NO_TEACHER = {"model": "", "checkpoint": "", "custom": {"vision_width": 0}}


def stages(config: ml_collections.ConfigDict) -> tuple:
  """The demo's stages: overrides of the students' config (train/plan.py)."""
  d = config.demo
  teacher = {"name": "teacher", "from_stage": -1, "teacher": _NO_TEACHER,
             "student": {"custom": config.teacher.custom.to_dict(), "init": "scratch"},
             "loss": _CLIP_LOSS, "masks": {"enabled": False},
             "total_steps": d.teacher_steps, "optimizer": {"lr": d.teacher_lr}}
  if d.get("auto"):
    return (teacher, {"name": "auto", "from_stage": -1, "teacher_from_stage": 0})
  return (teacher,
          {"name": "distilled", "from_stage": -1, "teacher_from_stage": 0,
           "student": {"init": "inherit"}},
          {"name": "scratch", "from_stage": -1, "teacher": _NO_TEACHER,
           "student": {"init": "scratch"}, "loss": _CLIP_LOSS})


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[plan_lib.Phase]:
  c = copy.deepcopy(config)
  with c.unlocked():
    c.stages = stages(config)
    del c["demo"]
  return plan_lib.plan(c, workdir)


def history(stage_dir: str) -> list[dict]:
  """Every evaluation a stage wrote (WORKDIR/evals/step_N.json), by step."""
  evals = storage.glob(workdir_lib.eval_results(stage_dir))
  return sorted((storage.read_json(f) for f in evals), key=lambda ev: ev["step"])


def _results(phases: list[plan_lib.Phase]) -> dict[str, dict]:
  """Per stage: its export, evaluations and final accuracy, read from its folder."""
  out = {}
  for p in phases:
    if not p.export:
      continue
    name = p.stage.split("_", 1)[1]
    done = storage.read_json(workdir_lib.stage_done(p.workdir))  # runner.DONE
    hist = history(p.workdir)
    cfg = CLIPConfig.from_dict(done["student_config"])
    out[name] = {"checkpoint": workdir_lib.final(p.workdir), "history": hist,
                 "config": cfg, "step": done["step"], "seconds": done.get("seconds")}
  return out


def _final(r: dict) -> dict:
  """A stage's evaluation at its last step (every run evaluates there)."""
  ev = r["history"][-1]
  assert ev["step"] == r["step"], (ev["step"], r["step"])
  return {"top1": ev["top1"], "top5": ev["top5"],
          "params": count_params(param_shapes(r["config"])), "checkpoint": r["checkpoint"]}


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
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  storage.write_bytes(path, buf.getvalue())
  plt.close(fig)


def _print_table(summary: dict) -> None:
  print(f"\n{'model':<10} {'params':>10} {'top-1':>7} {'top-5':>7}")
  for name in ("teacher", "distilled", "scratch", "auto"):
    if name in summary:
      s = summary[name]
      print(f"{name:<10} {s['params']:>10,} {100 * s['top1']:>6.1f}% {100 * s['top5']:>6.1f}%")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the demo's plan, then writes DIR/summary.json (and DIR/top1.png)."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  if "synthetic" not in [t.strip() for t in config.eval.get("tasks", "").split(",")]:
    raise prepare.SetupError(f"eval.tasks {config.eval.get('tasks')!r}: the demo compares its "
                             "models on the generated zero-shot split; keep 'synthetic' in it.")
  phases = plan(config, workdir)  # checks every stage before the teacher trains for minutes
  t0 = time.time()
  r = runner.run_plan(phases)
  if r.get("preempted"):
    return r
  results = _results(phases)
  path = workdir_lib.summary(workdir)
  # The other demo config's results stay (auto / students).
  summary = storage.read_json(path) if storage.exists(path) else {}
  summary.update({name: _final(res) for name, res in results.items()})
  summary["teacher_steps"] = config.demo.teacher_steps
  summary.setdefault("history", {}).update(
      {name: res["history"] for name, res in results.items() if name != "teacher"})
  summary.setdefault("seconds", {}).update(
      {name: res["seconds"] for name, res in results.items() if res["seconds"] is not None})
  summary["seconds"]["this_run"] = round(time.time() - t0, 1)
  if config.demo.get("auto"):
    auto = results["auto"]
    summary["auto"].update(steps=config.total_steps, prune_step=config.masks.prune_step,
                           target_sparsity=config.masks.target_sparsity,
                           structure=prune.structure(auto["config"]))
  else:
    summary["steps"] = config.total_steps
    summary["distilled_reached_scratch_at"] = reached_at(results["distilled"]["history"],
                                                         summary["scratch"]["top1"])
    _plot(workdir_lib.plot(workdir, "top1.png"), results["distilled"]["history"],
          results["scratch"]["history"], summary["teacher"]["top1"])
  storage.write_json(path, summary)
  _print_table(summary)
  if config.demo.get("auto"):
    print(f"auto: masks learned for {config.masks.prune_step} steps, pruned, distilled to step "
          f"{config.total_steps}; structure plots in {results['auto']['checkpoint']}/../structure")
  else:
    print(f"students trained {config.total_steps} steps each; distilled reached scratch's final "
          f"top-1 at step {summary['distilled_reached_scratch_at']}")
    print(f"wrote {workdir}/summary.json, {workdir}/top1.png; the models are in "
          f"{workdir}/<k>_<stage>/final")
  return summary
