"""The demo with a per-sample teacher cache (configs/demo_cache.py), in DIR/cache:

1. the demo's teacher stage (skipped when DIR holds it finished, as after the demo);
2. the students' training set written once as webdataset shards (DIR/cache/shards,
   lossless PNG from the demo's generator);
3. one per-sample teacher cache of K crops of every image (DIR/cache/teacher_k{K},
   `cache_teacher.build_samples`);
4. two students, manual inheritance (the demo's distilled student) and automatic
   inheritance (demo_auto's), each trained twice on those shards and crops: computing
   the teacher (`*_online`) and reading it from the cache (`*_cached`);
then DIR/cache/summary.json: each student's zero-shot top-1 and seconds, the cache's
build time, and the time the cache saved the two students.

python -m tinyclip_jax.main --config=configs/demo_cache.py --workdir=/tmp/demo
"""
from __future__ import annotations

import copy
import time

import ml_collections

from tinyclip_jax import cache_teacher, demo, demo_config, paths, storage
from tinyclip_jax import workdir as workdir_lib
from tinyclip_jax.data import make_shards, sample_cache, synthetic
from tinyclip_jax.train import plan as plan_lib, prepare, runner

SUBDIR = "cache"


def _without_demo(config) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  with c.unlocked():
    del c["demo"]
  return c


def _teacher(config, workdir: str) -> str:
  """The demo's teacher stage (trained here unless DIR holds it); its export."""
  c = _without_demo(config)
  with c.unlocked():
    c.stages = demo.stages(config)[:1]
  phases = plan_lib.plan(c, workdir)
  runner.run_plan(phases)
  return workdir_lib.final(phases[0].workdir)


def _shards(config, root: str) -> tuple[str, float]:
  """The training set as shards (written once); (pattern, seconds it took)."""
  d = config.demo.cache
  out = storage.join(root, "shards")
  want = {"samples": int(d.samples), "shards": int(d.shards), "image_size": int(d.image_size),
          "data": {k: config.data[k] for k in ("seed", "max_objects", "object_scale",
                                                "captions", "centred")},
          "backgrounds": list(config.data.backgrounds)}
  marker = storage.join(out, "done.json")
  if storage.exists(marker):
    have = storage.read_json(marker)
    if {k: v for k, v in have.items() if k != "seconds"} != want:
      raise prepare.SetupError(f"{out} holds the shards of other demo.cache settings; give "
                               "the demo a new workdir.")
    return storage.join(out, "*.tar"), have["seconds"]
  t0 = time.time()
  make_shards.write_shards(out, int(d.shards), int(d.samples) // int(d.shards),
                           spec=synthetic.from_data_config(config.data, int(d.image_size)),
                           lossless=True)
  seconds = round(time.time() - t0, 1)
  storage.write_json(marker, dict(want, seconds=seconds))
  return storage.join(out, "*.tar"), seconds


def _students(config, pattern: str, teacher: str) -> ml_collections.ConfigDict:
  """The students' config: the demo's, reading the shards and their K crops."""
  d = config.demo.cache
  c = _without_demo(config)
  with c.unlocked():
    c.data.kind = "webdataset"
    c.data.train = pattern
    c.data.augmentations = int(d.augmentations)
    c.data.crop_scale_min = float(d.crop_scale_min)
    c.teacher.checkpoint = teacher
  return c


def _cache_path(students, root: str) -> str:
  return storage.join(root, f"teacher_k{int(students.data.augmentations)}")


def _cache(students, root: str) -> tuple[str, dict]:
  """The per-sample cache of the demo's teacher (built once); (path, manifest)."""
  out = _cache_path(students, root)
  k = int(students.data.augmentations)
  manifest = storage.join(out, sample_cache.MANIFEST)
  if not storage.exists(manifest):
    cache_teacher.build_samples(copy.deepcopy(students), out, k)
  return out, storage.read_json(manifest)


def stages(config, cache: str) -> tuple:
  """The four students: manual and automatic inheritance, online and from the cache."""
  auto = copy.deepcopy(config)
  with auto.unlocked():
    demo_config.auto(auto)
  manual = {"from_stage": -1, "student": {"init": "inherit"}}
  d = config.demo.cache
  masks = dict(auto.masks.to_dict(), prune_step=int(d.auto_prune_step),
               sparsity_warmup=min(auto.masks.sparsity_warmup, int(d.auto_prune_step)))
  masked = {"from_stage": -1, "total_steps": int(d.auto_steps), "masks": masks,
            "student": {"custom": config.teacher.custom.to_dict(), "init": "inherit"}}
  cached = {"teacher": {"cache": cache}}
  out = []
  for name, student in (("manual", manual), ("auto", masked))[:2 if d.auto else 1]:
    if d.online:
      out.append({"name": f"{name}_online", **student})
    out.append({"name": f"{name}_cached", **student, **cached})
  return tuple(out)


def check(config, workdir: str) -> None:
  """demo.cache's fields and the workdir: one sentence each, before anything runs."""
  demo.check(config)
  d = config.demo.cache
  if int(d.augmentations) < 1:
    raise prepare.SetupError(f"demo.cache.augmentations={d.augmentations}: the cache stores "
                             "K >= 1 crops of each image; give 1 or more.")
  if int(d.shards) < 1 or int(d.samples) < int(d.shards) or d.samples % d.shards:
    raise prepare.SetupError(f"demo.cache.samples={d.samples} is not a multiple of "
                             f"demo.cache.shards={d.shards} (at least one sample per shard); "
                             "make it one.")
  if not 16 <= int(d.image_size) <= 1024:
    raise prepare.SetupError(f"demo.cache.image_size={d.image_size} must be in [16, 1024].")
  if not 0 < float(d.crop_scale_min) <= config.data.crop_scale_max:
    raise prepare.SetupError(f"demo.cache.crop_scale_min={d.crop_scale_min} must be in "
                             f"(0, data.crop_scale_max={config.data.crop_scale_max}].")
  if not 0 < int(d.auto_prune_step) < int(d.auto_steps):
    raise prepare.SetupError(f"demo.cache.auto_prune_step={d.auto_prune_step} must be "
                             f"between 0 and demo.cache.auto_steps={d.auto_steps}.")
  if storage.is_url(workdir):
    raise prepare.SetupError("configs/demo_cache.py writes its shards to a local workdir; "
                             "give a local --workdir.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  check(config, workdir)
  k = int(config.demo.cache.augmentations)
  t0 = time.time()
  teacher = _teacher(config, workdir)
  root = storage.join(workdir, SUBDIR)
  pattern, shard_seconds = _shards(config, root)
  students = _students(config, pattern, teacher)
  c = copy.deepcopy(students)
  with c.unlocked():
    c.stages = stages(config, _cache_path(students, root))
  phases = plan_lib.plan(c, root)
  runner.check_stages(phases)  # students started with other settings: before the build
  cache, manifest = _cache(students, root)
  r = runner.run_plan(phases)
  if r.get("preempted"):
    return r
  results = demo.results(phases)
  rows = {name: dict(demo.final_row(res), seconds=res["seconds"])
          for name, res in results.items()}
  build = manifest["build"]["seconds"]
  students = ("manual", "auto") if config.demo.cache.auto else ("manual",)
  cached = sum(rows[f"{s}_cached"]["seconds"] for s in students)
  seconds = {"shards": shard_seconds, "cache_build": round(build, 1),
             "cache_images_per_s": round(manifest["build"]["images_per_s"], 1),
             "students_cached": cached}
  if config.demo.cache.online:
    online = sum(rows[f"{s}_online"]["seconds"] for s in students)
    seconds.update(students_online=online, saved=round(online - cached - build, 1))
  summary = {"rows": rows, "augmentations": k,
             "crop_scale_min": float(config.demo.cache.crop_scale_min),
             "samples": int(config.demo.cache.samples),
             "seconds": dict(seconds, this_run=round(time.time() - t0, 1))}
  storage.write_json(storage.join(root, "summary.json"), summary)
  print(f"\n{'student':<16} {'params':>10} {'top-1':>7} {'seconds':>8}")
  for name, row in rows.items():
    print(f"{name:<16} {row['params']:>10,} {100 * row['top1']:>6.1f}% {row['seconds']:>8.1f}")
  s = summary["seconds"]
  print(f"cache: {k} crops of {summary['samples']} images built in {s['cache_build']:.0f} s "
        f"({s['cache_images_per_s']:.0f} images/s); the students took "
        + (f"{s['students_online']:.0f} s computing the teacher and " if "saved" in s else "")
        + f"{cached:.0f} s reading it"
        + (f": {s['saved']:+.0f} s with the build counted" if "saved" in s else "")
        + f"; wrote {root}/summary.json")
  return summary
