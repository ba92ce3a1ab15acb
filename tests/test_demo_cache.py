"""The demo with a per-sample teacher cache (configs/demo_cache.py), shrunk: the
teacher, the shards, one cache, and the manual and automatic students online and
cached. Reference for the summary: each stage's own evaluation files, done markers
and the cache's manifest, read here."""
from __future__ import annotations

import json
import os

import pytest

from tinyclip_jax import demo, demo_cache
from tinyclip_jax.train import prepare
from test_demo import tiny  # the tiny demo settings

pytestmark = pytest.mark.xdist_group("demo_cache")


def config(**overrides):
  c = tiny()
  from tinyclip_jax import demo_config  # pylint: disable=import-outside-toplevel
  with c.unlocked():
    demo_config.cached(c)
  c.demo.cache.update({"samples": 96, "shards": 2, "augmentations": 2, "auto_steps": 8,
                       "auto_prune_step": 4})
  c.update_from_flattened_dict(overrides)
  return c


def test_tiny_cached_demo(tmp_path, compile_cache):
  work = str(tmp_path / "demo")
  summary = demo.run(config(), work)
  root = tmp_path / "demo" / "cache"
  assert sorted(summary["rows"]) == ["auto_cached", "auto_online", "manual_cached",
                                     "manual_online"]
  manifest = json.loads((root / "teacher_k2" / "cache.json").read_text())
  assert manifest["augment"]["augmentations"] == 2
  assert sorted(manifest["shards"]) == ["00000.tar", "00001.tar"]
  assert sum(v["cached"] for v in manifest["shards"].values()) == 96
  seconds = {}
  for k, name in enumerate(("manual_online", "manual_cached", "auto_online", "auto_cached")):
    stage = root / f"{k}_{name}"
    done = json.loads((stage / "done.json").read_text())
    last = max((json.loads(p.read_text()) for p in (stage / "evals").glob("step_*.json")),
               key=lambda e: e["step"])
    row = summary["rows"][name]
    assert row["top1"] == last["top1"] and row["step"] == done["step"] == last["step"]
    assert row["seconds"] == done["seconds"]
    seconds[name] = done["seconds"]
    config_json = json.loads((stage / "stage_config.json").read_text())
    assert config_json["teacher"]["cache"] == (str(root / "teacher_k2")
                                                if name.endswith("cached") else "")
  assert summary["rows"]["auto_online"]["step"] == 8
  s = summary["seconds"]
  assert s["cache_build"] == round(manifest["build"]["seconds"], 1)
  online = seconds["manual_online"] + seconds["auto_online"]
  cached = seconds["manual_cached"] + seconds["auto_cached"]
  assert s["saved"] == round(online - cached - manifest["build"]["seconds"], 1)
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
