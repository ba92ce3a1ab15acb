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
import time

import ml_collections
import numpy as np

from tinyclip_jax import demo_probe as probe, paths, storage, workdir as workdir_lib
from tinyclip_jax.data import synthetic
from tinyclip_jax.inherit import prune
from tinyclip_jax.models import CLIPConfig, count_params, param_shapes
from tinyclip_jax.train import plan as plan_lib, prepare, runner


# Training without a teacher is plain CLIP: its contrastive loss with the learned
# temperature starting at 1/0.07, as CLIP trains (the distilled student keeps the fixed
# loss.student_scale).
_CLIP_LOSS = {"alpha": 0.0, "learn_scale": True, "student_scale": 1 / 0.07}
_NO_TEACHER = {"model": "", "checkpoint": "", "custom": {"vision_width": 0}}


def _seeded(seed: int) -> dict:
  # A seed varies a student's initialization and its data order; the teacher is shared.
  return {"seed": seed, "data": {"seed": seed}}


def stages(config: ml_collections.ConfigDict) -> tuple:
  """The demo's stages: overrides of the students' config (train/plan.py)."""
  d = config.demo
  teacher = {"name": "teacher", "from_stage": -1, "teacher": _NO_TEACHER,
             "student": {"custom": config.teacher.custom.to_dict(), "init": "scratch"},
             "loss": _CLIP_LOSS, "masks": {"enabled": False},
             "total_steps": d.teacher_steps,
             "optimizer": {"lr": d.teacher_lr, "warmup_steps": d.teacher_warmup},
             "eval_every": d.get("teacher_eval_every", config.eval_every)}
  if d.get("auto"):
    # The auto student starts as a copy of the teacher: its size is the teacher's as
    # this config (command line included) gives it.
    return (teacher, {"name": "auto", "from_stage": -1, "teacher_from_stage": 0,
                      "student": {"custom": config.teacher.custom.to_dict(),
                                  "init": "inherit"}})
  out = [teacher]
  for seed in range(d.seeds):
    out += [{"name": f"distilled_s{seed}", "from_stage": -1, "teacher_from_stage": 0,
             "student": {"init": "inherit"}, **_seeded(seed)},
            {"name": f"scratch_s{seed}", "from_stage": -1, "teacher": _NO_TEACHER,
             "student": {"init": "scratch"}, "loss": _CLIP_LOSS, **_seeded(seed)}]
  if d.get("ablation"):  # inheritance alone: the teacher's weights, no affinity mimicking
    out.append({"name": "inherit_clip_s0", "from_stage": -1, "teacher_from_stage": 0,
                "student": {"init": "inherit"}, "loss": _CLIP_LOSS, **_seeded(0)})
  if d.get("scratch_long"):
    out.append({"name": "scratch_long_s0", "from_stage": -1, "teacher": _NO_TEACHER,
                "student": {"init": "scratch"}, "loss": _CLIP_LOSS,
                "total_steps": 2 * config.total_steps, **_seeded(0)})
  return tuple(out)


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


def results(phases: list[plan_lib.Phase]) -> dict[str, dict]:
  """Per stage ("teacher", "distilled_s0", ...): its export, evaluations and time,
  read from its folder."""
  out = {}
  for p in phases:
    if not p.export:
      continue
    name = p.stage.split("_", 1)[1]
    done = storage.read_json(workdir_lib.stage_done(p.workdir))  # runner.DONE
    cfg = CLIPConfig.from_dict(done["student_config"])
    out[name] = {"checkpoint": workdir_lib.final(p.workdir), "history": history(p.workdir),
                 "config": cfg, "step": done["step"], "seconds": done.get("seconds")}
  return out


_METRICS = ("top1", "top5", "colour_top1", "shape_top1")


def final_row(r: dict) -> dict:
  """A stage's evaluation at its last step (every run evaluates there)."""
  ev = r["history"][-1]
  if ev["step"] != r["step"]:
    raise prepare.SetupError(f"{r['checkpoint']}: the last evaluation is of step {ev['step']}, "
                             f"not of the exported step {r['step']}; give the demo a new "
                             "workdir.")
  return {**{k: ev[k] for k in _METRICS if k in ev}, "step": r["step"],
          "params": count_params(param_shapes(r["config"])), "checkpoint": r["checkpoint"]}


def reached_at(history: list[dict], target: float):
  """First evaluated step whose top-1 reached `target`, or None."""
  return next((h["step"] for h in history if h["top1"] >= target), None)


def last_quarter_gain(history: list[dict]) -> float:
  """top-1 at the end minus top-1 at 3/4 of the steps (the nearest evaluation before)."""
  end = history[-1]["step"]
  at = [h for h in history if h["step"] <= 0.75 * end]
  return history[-1]["top1"] - (at[-1]["top1"] if at else 0.0)


def _mean(rows: list[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in rows])) for k in _METRICS if all(k in r for r in rows)}


def compare(rows: dict[str, dict], histories: dict[str, list[dict]], seeds: int,
            steps: int) -> dict:
  """Per seed: distilled vs scratch top-1 gain and the step at which distilled first
  reached scratch's final top-1 (None: never); their means; and whether every seed
  gains and reaches it within half the steps."""
  per_seed = []
  for s in range(seeds):
    d, sc = rows[f"distilled_s{s}"], rows[f"scratch_s{s}"]
    at = reached_at(histories[f"distilled_s{s}"], sc["top1"])
    per_seed.append({"seed": s, "distilled_top1": d["top1"], "scratch_top1": sc["top1"],
                     "gain": d["top1"] - sc["top1"], "reached_scratch_at": at,
                     "fraction_of_steps": None if at is None else at / steps,
                     "scratch_last_quarter_gain": last_quarter_gain(histories[f"scratch_s{s}"])})
  fractions = [p["fraction_of_steps"] for p in per_seed]
  return {"per_seed": per_seed,
          "mean_gain": float(np.mean([p["gain"] for p in per_seed])),
          "mean_fraction_of_steps": (None if None in fractions else float(np.mean(fractions))),
          "every_seed_gains": all(p["gain"] > 0 for p in per_seed),
          "every_seed_within_half": all(f is not None and f <= 0.5 for f in fractions)}


def _print_table(summary: dict) -> None:
  print(f"\n{'model':<28} {'params':>10} {'top-1':>7} {'top-5':>7} {'colour':>7} {'shape':>7}")
  for name, s in summary["rows"].items():
    print(f"{name:<28} {s['params']:>10,} " + " ".join(
        f"{100 * s.get(k, float('nan')):>6.1f}%" for k in _METRICS))


# demo_auto's own keys (its times too: the demo's "this_run" and "pictures" stay).
_AUTO_KEYS = ("auto", "probe_auto", "auto_this_run", "auto_pictures")


def _other_configs_part(old: dict, auto: bool) -> dict:
  """What summary.json holds of the other demo config: demo_auto's rows and keys for
  the demo, everything but those for demo_auto."""
  mine = (lambda k: k in _AUTO_KEYS) if auto else (lambda k: k not in _AUTO_KEYS)
  out = {k: v for k, v in old.items() if k not in ("rows", "history", "seconds") and not mine(k)}
  for part in ("rows", "history", "seconds"):
    out[part] = {k: v for k, v in old.get(part, {}).items()
                 if k != "teacher" and not mine(k)}
  return out


def _write_summary(config, workdir: str, results: dict, t0: float) -> dict:
  path = workdir_lib.summary(workdir)
  # The other demo config's results stay (demo_auto's beside the students'); this
  # config's are replaced whole, so rows of another seed count never linger.
  old = storage.read_json(path) if storage.exists(path) else {}
  summary = _other_configs_part(old, bool(config.demo.get("auto")))
  rows = {name: final_row(r) for name, r in results.items()}
  # The shared teacher's row first, whichever config ran last.
  summary["rows"] = {"teacher": rows.pop("teacher"), **summary.get("rows", {}), **rows}
  summary.setdefault("history", {}).update(
      {name: r["history"] for name, r in results.items() if name != "teacher"})
  summary.setdefault("seconds", {}).update(
      {name: r["seconds"] for name, r in results.items() if r["seconds"] is not None})
  summary["teacher_steps"] = config.demo.teacher_steps
  t1 = time.time()
  if config.demo.get("auto"):
    auto = results["auto"]
    summary["auto"] = {"steps": config.total_steps, "prune_step": config.masks.prune_step,
                       "target_sparsity": config.masks.target_sparsity,
                       "structure": prune.structure(auto["config"])}
    summary["probe_auto"] = probe.run(config, results, ("teacher", "auto"), affinity=False)
    probe.draw_auto(workdir, summary, results)
  else:
    seeds = int(config.demo.seeds)
    summary["steps"], summary["seeds"] = config.total_steps, list(range(seeds))
    summary["distilled"] = _mean([summary["rows"][f"distilled_s{s}"] for s in range(seeds)])
    summary["scratch"] = _mean([summary["rows"][f"scratch_s{s}"] for s in range(seeds)])
    summary["comparison"] = compare(summary["rows"], summary["history"], seeds,
                                    config.total_steps)
    summary["probe"] = probe.run(config, results, ("teacher", "distilled_s0", "scratch_s0"))
    probe.draw(workdir, summary)
  own = "auto_" if config.demo.get("auto") else ""
  summary["seconds"][own + "pictures"] = round(time.time() - t1, 1)
  # this_run: this command's time (a run that resumed or found every stage finished
  # is shorter than the stages' own times, which are kept per stage).
  summary["seconds"][own + "this_run"] = round(time.time() - t0, 1)
  storage.write_json(path, summary)
  return summary


def check(config: ml_collections.ConfigDict) -> None:
  """The demo's own fields: one sentence each (prepare.SetupError, exit 2)."""
  if "synthetic" not in [t.strip() for t in config.eval.get("tasks", "").split(",")]:
    raise prepare.SetupError(f"eval.tasks {config.eval.get('tasks')!r}: the demo compares its "
                             "models on the generated zero-shot split; keep 'synthetic' in it.")
  d = config.demo
  if not config.demo.get("auto") and int(d.seeds) < 1:
    raise prepare.SetupError(f"demo.seeds={d.seeds}: the demo trains each student once per "
                             "seed; give at least 1 (the README's figures use 3).")
  if not 1 <= int(d.grid) <= 64:
    raise prepare.SetupError(f"demo.grid={d.grid} must be in [1, 64] (images in its picture).")
  # affinity.png's batch is one colour's shapes (split indices 0, 1, …): at most one of each.
  shapes = len(synthetic.SHAPES)
  if not 1 <= int(d.affinity) <= shapes:
    raise prepare.SetupError(f"demo.affinity={d.affinity} must be in [1, {shapes}] (one colour's "
                             "shapes in its picture).")


# The teacher stage's fields the demo sets from its own (stages()): a folder started with
# another value is refused naming the field the user sets (runner.StageChanged.named).
_TEACHER_FIELDS = {"total_steps": "demo.teacher_steps", "optimizer.lr": "demo.teacher_lr",
                   "optimizer.warmup_steps": "demo.teacher_warmup"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the demo's plan, then writes DIR/summary.json and its pictures."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  check(config)
  phases = plan(config, workdir)  # checks every stage before the teacher trains for minutes
  t0 = time.time()
  try:
    r = runner.run_plan(phases)
  except runner.StageChanged as e:
    if e.stage == phases[0].stage and e.field in _TEACHER_FIELDS:  # the teacher stage
      raise e.named(_TEACHER_FIELDS[e.field]) from e
    raise
  if r.get("preempted"):
    return r
  summary = _write_summary(config, workdir, results(phases), t0)
  _print_table(summary)
  if config.demo.get("auto"):
    print(f"auto: masks learned for {config.masks.prune_step} steps, pruned, distilled to step "
          f"{config.total_steps}; wrote {workdir}/auto.png")
  else:
    c = summary["comparison"]
    print(f"students trained {config.total_steps} steps, {config.demo.seeds} seed(s); distilled "
          f"gains {100 * c['mean_gain']:+.1f} points of top-1 over scratch on average; it "
          f"reached scratch's final top-1 at " + ", ".join(
              str(p["reached_scratch_at"]) for p in c["per_seed"]) + " steps")
    print(f"wrote {workdir}/summary.json and the pictures {workdir}/top1.png, "
          f"{workdir}/guesses.png, {workdir}/affinity.png; the models are in "
          f"{workdir}/<k>_<stage>/final")
  return summary
