"""The demo with a per-sample teacher cache (configs/demo_cache.py), shrunk: the
teacher, the shards, one cache, and the manual and automatic students online and
cached. Reference for the summary: each stage's own evaluation files, done markers
and the cache's manifest, read here."""
from __future__ import annotations

import json
import os

import pytest

from tinyclip_jax import demo, demo_cache, demo_config, workdir as workdir_lib
from tinyclip_jax.train import prepare

pytestmark = pytest.mark.xdist_group("demo_cache")


TINY = {"demo.teacher_steps": 4, "demo.teacher_eval_every": 2, "total_steps": 4,
        "batch_size": 16, "log_every": 2, "eval_every": 2, "checkpoint_every": 100,
        "eval.num_examples": 32, "eval.batch_size": 32,
        "teacher.custom.vision_width": 64, "teacher.custom.text_width": 64,
        "teacher.custom.vision_layers": 2, "teacher.custom.text_layers": 2,
        "student.custom.vision_width": 32, "student.custom.text_width": 32,
        "student.custom.vision_layers": 1, "student.custom.text_layers": 1,
        "demo.cache.samples": 96, "demo.cache.shards": 2, "demo.cache.augmentations": 2,
        "demo.cache.auto_steps": 4, "demo.cache.auto_prune_step": 2,
        # The cached students only (the online twins are the same stages without
        # teacher.cache, which the per-sample cache tests compare step by step).
        "demo.cache.online": False}


def config(**overrides):
  c = demo_config.cached(demo_config.get_config())
  c.update_from_flattened_dict({**TINY, **overrides})
  return c


def test_tiny_cached_demo(tmp_path, compile_cache):
  work = str(tmp_path / "demo")
  summary = demo.run(config(), work)
  root = tmp_path / "demo" / "cache"
  assert sorted(summary["rows"]) == ["auto_cached", "manual_cached"]
  manifest = json.loads((root / "teacher_k2" / "cache.json").read_text())
  assert manifest["augment"]["augmentations"] == 2
  assert sorted(manifest["shards"]) == ["00000.tar", "00001.tar"]
  assert sum(v["cached"] for v in manifest["shards"].values()) == 96
  seconds = {}
  for k, name in enumerate(("manual_cached", "auto_cached")):
    stage = root / f"{k}_{name}"
    done = json.loads((stage / workdir_lib.STAGE_DONE).read_text())
    last = max((json.loads(p.read_text()) for p in (stage / "evals").glob("step_*.json")),
               key=lambda e: e["step"])
    row = summary["rows"][name]
    assert row["top1"] == last["top1"] and row["step"] == done["step"] == last["step"]
    assert row["seconds"] == done["seconds"]
    seconds[name] = done["seconds"]
    config_json = json.loads((stage / "stage_config.json").read_text())
    assert config_json["teacher"]["cache"] == str(root / "teacher_k2")
    assert config_json["data"]["augmentations"] == 2
  assert summary["rows"]["auto_cached"]["step"] == 4
  auto = json.loads((root / "1_auto_cached" / "stage_config.json").read_text())
  assert auto["masks"]["enabled"] and auto["student"]["custom"]["vision_width"] == 64
  s = summary["seconds"]
  assert s["cache_build"] == round(manifest["build"]["seconds"], 1)
  assert s["students_cached"] == seconds["manual_cached"] + seconds["auto_cached"]
  assert json.loads((root / "summary.json").read_text()) == summary

  # Run again: every stage is finished, the shards and the cache are not made again.
  stamp = os.stat(root / "teacher_k2" / "cache.json").st_mtime_ns
  again = demo.run(config(), work)
  assert os.stat(root / "teacher_k2" / "cache.json").st_mtime_ns == stamp
  assert again["rows"] == summary["rows"]


def test_bad_cache_settings_are_refused(tmp_path):
  with pytest.raises(prepare.SetupError, match=r"demo.cache.augmentations=0"):
    demo_cache.run(config(**{"demo.cache.augmentations": 0}), str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()
