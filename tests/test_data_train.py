"""The training loop on webdataset shards: skipped counts and eval-suite results in
metrics.jsonl and evals/, the input position of the consumed batch in every
checkpoint, and a resumed run restarting from exactly that position."""
import importlib.util
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from tinyclip_jax import checkpoint
from tinyclip_jax.data import make_shards, sharded
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.train import compile as compile_lib, loop, prepare, runner

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def config(pattern, steps):
  spec = importlib.util.spec_from_file_location("smoke_config", SMOKE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.update_from_flattened_dict({
      "teacher.custom.vision_width": 0,
      "loss.alpha": 0.0,
      "student.init": "scratch",
      "data.kind": "webdataset",
      "data.train": pattern,
      "data.shards_per_window": 2,
      "data.shuffle_buffer": 8,
      "total_steps": steps,
      "log_every": 2,
      "checkpoint_every": 2,
      "eval_every": 2,
      "eval.tasks": f"wds:{pattern}",
      "eval.max_examples": 16,
      "eval.batch_size": 16
  })
  return c


def saved_input(workdir, step):
  mgr = checkpoint.manager(str(workdir), 3)
  return mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]


@pytest.fixture
def compile_cache(tmp_path):
  """The resumed run loads the first run's executables instead of compiling again."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def test_train_resume_and_eval_on_shards(tmp_path, monkeypatch, compile_cache):
  bad = {1: "corrupt_image", 5: "missing_caption", 30: "tiny_image"}
  make_shards.write_shards(str(tmp_path / "wds"), 2, 24, 32, bad=bad)
  pattern = f"{tmp_path}/wds/{{00000..00001}}.tar"
  work = tmp_path / "run"
  runner.run(config(pattern, 4), str(work))

  rows = {r["step"]: r for r in read_jsonl(work / "metrics.jsonl")}
  task = f"eval/wds:{pattern}"
  assert {f"{task}/image_to_text/R@1", f"{task}/text_to_image/R@10"} <= set(rows[2])
  assert rows[4][f"{task}/num_images"] == 16
  assert sum(
      rows[4][f"skipped/{r}"] for r in ("corrupt_image", "missing_caption", "tiny_image")) >= 1
  ev = json.loads((work / "evals" / "step_00000004.json").read_text())
  assert ev["step"] == 4 and ev[f"wds:{pattern}/num_images"] == 16

  # the checkpoint holds the position after the 4th batch, not the prefetcher's
  reference = sharded.ShardedPairs(config(pattern, 4).data, 32, 32, 16)
  for step in (1, 2, 3, 4):
    reference.next_batch()
    if step % 2 == 0:
      assert saved_input(work, step) == {"hosts": [reference.get_state()]}

  restored = []
  set_state = sharded.ShardedPairs.set_state
  monkeypatch.setattr(sharded.ShardedPairs, "set_state", lambda self, s:
                      (restored.append(s), set_state(self, s)))
  runner.run(config(pattern, 6), str(work))
  assert restored == [saved_input(work, 4)["hosts"][0]]
  reference.next_batch()
  reference.next_batch()
  assert saved_input(work, 6) == {"hosts": [reference.get_state()]}


def test_missing_shard_fails_before_compiling(tmp_path):
  make_shards.write_shards(str(tmp_path / "wds"), 2, 4, 32)
  pattern = f"{tmp_path}/wds/{{00000..00002}}.tar"
  with pytest.raises(prepare.SetupError, match="00002.tar does not exist"):
    runner.run(config(pattern, 2), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  good = config(f"{tmp_path}/wds/*.tar", 2)
  prepare.validate(good)
  good.eval.tasks = "cifar10,imagenet9"
  with pytest.raises(prepare.SetupError, match="eval task 'imagenet9' is unknown"):
    prepare.validate(good)
  good.eval.tasks, good.data.kind = "", "laion"
  with pytest.raises(prepare.SetupError, match="data.kind 'laion' is unknown"):
    prepare.validate(good)
