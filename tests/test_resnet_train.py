"""Distilling a ResNet student from a ResNet teacher through the real loop: BatchNorm
statistics in the train state, sharded (8 devices) == single device, checkpointed
and resumed, exported with the weights, used by evaluation and the embedding CLI.

Three loop runs share one module fixture: 8 devices, 1 device, and a resume of the
8-device run from its step-2 checkpoint.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from tests.resnet_reference import CLIP as TorchCLIP, randomize
from tests.test_resnet import numpy_sd
from tinyclip_jax import checkpoint, embed, model_io, parallel
from tinyclip_jax.convert.common import flatten
from tinyclip_jax.convert.openai import from_openai, to_open_clip
from tinyclip_jax.metrics import read_jsonl
from tinyclip_jax.models import CLIPConfig, resnet_tower, split_stats, text_tower
from tinyclip_jax.preprocess import CLIP_MEAN, CLIP_STD
from tinyclip_jax.train import defaults, loop, prepare, runner

pytestmark = pytest.mark.xdist_group("resnet_train")

# Stages of one block (the fewest convolutions to compile); the student keeps the
# teacher's text tower (head_dim 64, as converted checkpoints have) and halves the width.
TEXT = text_tower(64, 1, context_length=32)
TEACHER = CLIPConfig(32, resnet_tower(16, (1, 1, 1, 1), image_size=64), TEXT)
STUDENT = CLIPConfig(32, resnet_tower(8, (1, 1, 1, 1), image_size=64), TEXT)
STEPS = 4
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def smoke_config(overrides: dict):
  spec = importlib.util.spec_from_file_location("smoke_config", SMOKE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def config(**overrides):
  # No zero-shot eval in the loop (its compile is the costliest part here); the embed
  # CLI test below runs the same jitted encoders on the exported weights.
  c = smoke_config({
      "total_steps": STEPS,
      "checkpoint_every": 2,
      "log_every": 1,
      "eval.tasks": "",
      **overrides
  })
  c.teacher.model, c.student.model = "", "tiny-rn-student"
  return c


def patch_models(mp: pytest.MonkeyPatch):
  mp.setattr(defaults, "build_model_config", lambda spec, what: STUDENT)


def run(workdir, devices, teacher):
  """loop.run with the converted-style teacher folder (a ResNet with random weights)."""
  with pytest.MonkeyPatch.context() as mp:
    patch_models(mp)
    real = parallel.make_mesh
    mp.setattr(parallel, "make_mesh", lambda sizes, _=None: real(sizes, devices))
    mesh = {"mesh.data": 4, "mesh.fsdp": 2} if len(devices) == 8 else {}
    return runner.run(config(**mesh, **{"teacher.checkpoint": str(teacher)}), str(workdir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """`sharded`: 4 steps on 8 devices (data 4 × fsdp 2), checkpoints at steps 2 and 4.
  `resumed`: a copy of its folder as it was after step 2, resumed on ONE device: its
  steps 3-4 start from the checkpointed statistics and must equal the sharded run's."""
  # The teacher: a random PyTorch ResNet CLIP (running statistics too), converted.
  teacher = tmp_path_factory.mktemp("teacher") / "model"
  torch.manual_seed(1)
  weights, cfg = from_openai(numpy_sd(randomize(TorchCLIP.from_config(TEACHER), 1)), "gelu")
  assert cfg == TEACHER
  model_io.save_model(str(teacher), weights, cfg)
  sharded_dir = tmp_path_factory.mktemp("sharded")
  sharded = run(sharded_dir, jax.devices(), teacher=teacher)
  resumed_dir = tmp_path_factory.mktemp("resumed") / "run"
  shutil.copytree(sharded_dir, resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / str(STEPS))
  shutil.rmtree(resumed_dir / "final")
  resumed = run(resumed_dir, jax.devices()[:1], teacher=teacher)
  return dict(
      sharded=sharded,
      resumed=resumed,
      sharded_dir=sharded_dir,
      resumed_dir=resumed_dir,
      teacher=teacher)


def split(result):
  return split_stats(prepare.as_numpy(result["params"]))


def assert_close(got, want, rtol, atol, what):
  for k, w in flatten(want).items():
    np.testing.assert_allclose(flatten(got)[k], w, rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")}


def test_batch_stats_train_checkpoint_and_resume_on_one_device(runs):
  params, stats = split(runs["sharded"])
  params1, stats1 = split(runs["resumed"])
  assert stats is not None and "mean" in stats["visual"]["bn1"]
  # The running statistics moved away from their initial (0, 1) with the steps' batches.
  assert np.abs(stats["visual"]["layer4_0"]["bn3"]["mean"]).max() > 1e-3
  assert np.abs(stats["visual"]["bn1"]["var"] - 1).max() > 1e-3
  # The checkpoint holds them (restored with the state's own abstract tree).
  mgr = checkpoint.manager(str(runs["sharded_dir"]), 3)
  assert sorted(mgr.all_steps()) == [2, STEPS]
  with pytest.MonkeyPatch.context() as mp:
    patch_models(mp)
    setup, _ = prepare.build(config(**{"teacher.checkpoint": str(runs["teacher"])}), restoring=True)
  step, state, _ = checkpoint.restore_latest(mgr, setup.abstract_state)
  assert step == STEPS
  jax.tree.map(np.testing.assert_array_equal, prepare.as_numpy(state.batch_stats), stats)
  # Steps 3-4 on one device from the step-2 checkpoint == on 8 devices: the sharded
  # BatchNorm used the global batch's statistics, and resume restored them.
  got, want = losses(runs["resumed_dir"]), losses(runs["sharded_dir"])
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]  # rows 1-2 came with the copied folder
  for s in got:
    np.testing.assert_allclose(got[s], want[s], rtol=1e-5, err_msg=f"step {s}")
  assert_close(stats1, stats, 1e-5, 1e-6, "batch_stats")
  # Adam steps are ~lr = 1e-3; a gradient that is zero in exact arithmetic (the key
  # bias of attention) is rounding noise that Adam normalizes, hence the atol.
  assert_close(params1, params, 1e-4, 1e-5, "params")


def test_export_and_embed_cli_use_running_statistics(runs, tmp_path):
  """The exported model (with trained running statistics) embeds images through the
  embedding CLI as the PyTorch reference does in eval mode with the same buffers."""
  weights, cfg = model_io.load_model(str(runs["sharded_dir"] / "final"))
  assert cfg == STUDENT
  jax.tree.map(np.testing.assert_array_equal, weights, prepare.as_numpy(runs["sharded"]["params"]))
  ref = TorchCLIP.from_config(cfg)
  ref.load_state_dict(
      {
          k: torch.from_numpy(np.asarray(v)) for k, v in to_open_clip(weights, cfg).items()
      },
      strict=True)
  ref.eval()
  images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  out = embed.run([
      f"--checkpoint={runs['sharded_dir'] / 'final'}", f"--images={tmp_path / 'images.npy'}",
      f"--output={tmp_path / 'e.npz'}"
  ])
  x = (images / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  with torch.no_grad():
    want = ref.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
  np.testing.assert_allclose(out["image_embeds"], want, atol=1e-5)


def test_microbatches_refuse_a_batch_norm_student():
  with pytest.MonkeyPatch.context() as mp:
    patch_models(mp)
    with pytest.raises(
        prepare.SetupError,
        match=r"^microbatch_size 2 \(gradient caching\) "
        r"cannot train a BatchNorm \(ResNet\) student.*microbatch_size=0\.$"):
      prepare.build(config(microbatch_size=2), restoring=False)


def test_paper_configs_inherit_their_students_from_rn50():
  """Shape-only: RN50 → the released students by the per-stage rule; RN101's 512-wide
  embedding cannot seed them (one sentence, before any tensor is touched)."""
  from tinyclip_jax.inherit.manual import InheritError, inherit
  from tinyclip_jax.models import param_shapes, zoo
  rn50 = zoo.get("RN50")
  rn50_shapes = param_shapes(rn50)
  for name, student in (("rn30m", "TinyCLIP-ResNet-30M-Text-29M"),
                        ("rn19m", "TinyCLIP-ResNet-19M-Text-19M")):
    spec = importlib.util.spec_from_file_location(name, SMOKE.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert (c.teacher.model, c.student.model, c.microbatch_size) == ("RN50", student, 0)
    assert mod.get_config("RN101").teacher.model == "RN101"
    s = zoo.get(student)
    out = jax.eval_shape(lambda w, s=s: inherit(w, rn50, s), rn50_shapes)
    assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, param_shapes(s))
    with pytest.raises(
        InheritError, match="student embed_dim 1024 exceeds teacher embed_dim "
        "512"):
      inherit({}, zoo.get("RN101"), s)
