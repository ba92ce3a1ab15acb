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


def test_students_started_with_another_k_are_refused_before_a_cache_is_built(tmp_path):
  """demo_cache.run checks the student stages (runner.check_stages) before building the
  cache of a changed demo.cache.augmentations, which would cost K teacher forwards per
  image only for run_plan to refuse the stages afterwards."""
  from tinyclip_jax import storage, workdir  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import plan, runner  # pylint: disable=import-outside-toplevel

  from tinyclip_jax.data import make_shards  # pylint: disable=import-outside-toplevel
  make_shards.write_shards(str(tmp_path / "s"), 1, 2)
  pattern = str(tmp_path / "s" / "*.tar")

  def phases(k):
    s = demo_cache._students(config(**{"demo.cache.augmentations": k}), pattern, "/t")  # pylint: disable=protected-access
    with s.unlocked():
      s.stages = demo_cache.stages(config(), demo_cache._cache_path(s, str(tmp_path)))  # pylint: disable=protected-access
    return plan.plan(s, str(tmp_path))

  first = phases(4)
  runner.check_stages(first)  # nothing started yet
  stage = first[0]
  storage.write_json(workdir.stage_config(stage.workdir), runner.identity(stage.config))
  runner.check_stages(phases(4))  # the same settings resume
  with pytest.raises(runner.StageChanged, match="was started with data.augmentations=4 and "
                                                "this config gives 2"):
    runner.check_stages(phases(2))
