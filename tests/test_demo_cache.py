"""The cached demo's plan and settings (configs/demo_cache.py). Its end-to-end run is
in tests/test_run_plan.py (after the demo and demo_auto, in the same folder, which
takes the finished teacher stage as it is)."""
from __future__ import annotations

import pytest

from tinyclip_jax import demo_cache, demo_config
from tinyclip_jax.train import prepare


def config(**overrides):
  c = demo_config.cached(demo_config.get_config())
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize("online,auto,names", [
    (True, True, ["manual_online", "manual_cached", "auto_online", "auto_cached"]),
    (False, True, ["manual_cached", "auto_cached"]),
    (False, False, ["manual_cached"]),
])
def test_stages_are_the_two_students_cached_and_online(online, auto, names):
  c = config(**{"demo.cache.online": online, "demo.cache.auto": auto,
                "demo.cache.auto_steps": 40, "demo.cache.auto_prune_step": 20})
  stages = demo_cache.stages(c, "/cache")
  assert [s["name"] for s in stages] == names
  for s in stages:
    assert s["from_stage"] == -1 and s["student"]["init"] == "inherit"
    assert s.get("teacher", {}).get("cache", "") == ("/cache" if "cached" in s["name"] else "")
    if s["name"].startswith("auto"):  # demo_auto's student: the teacher's size, masks on
      assert s["student"]["custom"] == c.teacher.custom.to_dict()
      assert s["masks"]["enabled"] and s["masks"]["prune_step"] == 20
      assert s["total_steps"] == 40 and s["masks"]["sparsity_warmup"] == 20
    else:
      assert "masks" not in s and "total_steps" not in s


@pytest.mark.parametrize("field,value,match", [
    ("demo.cache.augmentations", 0, r"demo.cache.augmentations=0: the cache stores K >= 1"),
    ("demo.cache.samples", 97, r"demo.cache.samples=97 is not a multiple of"),
    ("demo.cache.auto_prune_step", 300, r"auto_prune_step=300 must be between 0 and"),
    ("demo.cache.crop_scale_min", 0.0, r"crop_scale_min=0.0 must be in \(0, "),
])
def test_bad_cache_settings_are_refused(tmp_path, field, value, match):
  c = config(**{field: value})
  with pytest.raises(prepare.SetupError, match=match):
    demo_cache.run(c, str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()  # refused before the teacher trains
