"""The guard against silent replication: which parameters the mesh does not divide
(and so replicates), the bound on their bytes, and the prune's rounding of kept
widths to the mesh (masks.round_to), which keeps the highest-scoring units."""
import dataclasses
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from configs import smoke
from tinyclip_jax import parallel
from tinyclip_jax.inherit import masks
from tinyclip_jax.models import param_shapes
from tinyclip_jax.models.clip import logical_axes
from tinyclip_jax.train import defaults, masking

ROOT = Path(__file__).resolve().parents[1]
MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def tiny_model():
  """smoke's teacher on 2 layers, with the demo's non-dividing pruned widths in the
  image tower (hidden 98 on fsdp=4, MLP 103 on tensor=2 in layer 0) and 3 heads in
  the text tower's layer 0 (tensor=2); a 512-token vocabulary, so the towers weigh."""
  c = smoke.get_config()
  c.teacher.custom.update(vision_layers=2, text_layers=2)
  cfg = defaults.build_model_config(c.teacher, "teacher")
  vision = dataclasses.replace(cfg.vision, width=98, mlp=(103, 256))
  text = dataclasses.replace(cfg.text, heads=(3, 2), vocab_size=512,
                             eot_token_id=511)  # the towers weigh, not the tokens
  return cfg.replace(vision=vision, text=text)


def flat_shapes(cfg):
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))}


def test_report_lists_exactly_the_params_the_mesh_does_not_divide():
  cfg = tiny_model()
  mesh = parallel.make_mesh(MESH)
  shardings = parallel.logical_to_sharding(logical_axes(cfg), mesh)
  report = parallel.replication_report(shardings, param_shapes(cfg), mesh)

  shapes = flat_shapes(cfg)
  # By the model's structure: every image-tower weight over the hidden width (98 % 4)
  # — all but the qkv biases (heads × head dim only, 2 heads divide) and layer 1's
  # MLP bias (256 units); layer 0's MLP bias (103 % 2); the text tower's layer-0
  # attention weights over its 3 heads (3 % 2).
  want = {n for n in shapes if n.startswith("['visual']") and "in_proj_bias" not in n
          and n != "['visual']['layers_1']['mlp']['c_fc']['bias']"}
  want |= {f"['text']['layers_0']['attn']['{k}']"
           for k in ("in_proj_kernel", "in_proj_bias", "out_proj_kernel")}
  assert {r.name for r in report.rows} == want
  nbytes = {n: 4 * math.prod(s) for n, s in shapes.items()}  # float32
  assert all(r.nbytes == nbytes[r.name] for r in report.rows)
  assert report.replicated_bytes == sum(nbytes[n] for n in want)
  assert report.total_bytes == sum(nbytes.values())
  assert report.fraction == pytest.approx(sum(nbytes[n] for n in want) / sum(nbytes.values()),
                                          rel=1e-12)
  assert [r.nbytes for r in report.rows] == sorted((r.nbytes for r in report.rows), reverse=True)
  rows = {r.name: r for r in report.rows}
  assert rows["['visual']['layers_0']['mlp']['c_fc']['kernel']"].dropped == ("fsdp", "tensor")
  assert rows["['visual']['layers_0']['mlp']['c_fc']['kernel']"].fully
  assert rows["['visual']['layers_1']['mlp']['c_fc']['kernel']"].dropped == ("fsdp",)
  assert not rows["['visual']['layers_1']['mlp']['c_fc']['kernel']"].fully
  assert rows["['text']['layers_0']['attn']['in_proj_kernel']"].dropped == ("tensor",)


def test_a_model_the_mesh_divides_reports_nothing():
  cfg = defaults.build_model_config(smoke.get_config().teacher, "teacher")  # 64 wide, 2 heads
  mesh = parallel.make_mesh(MESH)
  report = parallel.replication_report(parallel.logical_to_sharding(logical_axes(cfg), mesh),
                                       param_shapes(cfg), mesh)
  assert report.rows == () and report.fraction == 0.0
  assert parallel.check_replication(report, 0.0, "error", "teacher") == ""


def test_over_the_bound_warns_or_stops_with_one_sentence(caplog):
  cfg = tiny_model()
  mesh = parallel.make_mesh(MESH)
  report = parallel.replication_report(parallel.logical_to_sharding(logical_axes(cfg), mesh),
                                       param_shapes(cfg), mesh)
  assert 0.01 < report.fraction < 0.99
  # Within the bound: logged, no warning, no error.
  assert parallel.check_replication(report, report.fraction + 1e-6, "error", "student") == ""
  with caplog.at_level(logging.WARNING):
    msg = parallel.check_replication(report, report.fraction - 1e-6, "warn", "student")
  assert msg and msg in caplog.text
  with pytest.raises(parallel.ReplicationError) as e:
    parallel.check_replication(report, 0.01, "error", "student")
  text = str(e.value)
  assert isinstance(e.value, ValueError)
  assert text.split("; ")[1:] == msg.split("; ")[1:]  # the same rows and fix as the warning
  assert f"{100 * report.fraction:.1f}% of the parameter bytes" in text
  assert "\n" not in text and text.endswith(".") and text.count("; ") >= 2
  assert text.startswith("student: ") and "mesh.max_replicated_fraction" in text
  assert report.rows[0].name in text  # the largest replicated parameter is named
  assert "mesh.fsdp" in text  # the fix
  with pytest.raises(ValueError, match="mesh.replication 'stop' is unknown"):
    parallel.check_replication(report, 0.05, "stop", "student")


@pytest.mark.parametrize("kept, size, m, want", [
    (3, 98, 4, 4), (2, 98, 4, 4), (1, 98, 4, 4), (0, 98, 4, 0), (5, 98, 4, 4),
    (6, 98, 4, 8), (97, 98, 4, 96), (98, 98, 4, 96), (3, 3, 4, 3), (51, 103, 2, 52),
    (7, 12, 1, 7),
])
def test_round_kept_to_the_nearest_multiple(kept, size, m, want):
  got = masks.round_kept(np.float32(kept), np.float32(size), m)
  assert float(got) == want


def reference_gates(loga: np.ndarray, m: int) -> np.ndarray:
  """The deterministic gate of one row by the reference's rule in torch, with the
  kept count rounded to a multiple of m (nearest, ties up, not 0 for a nonzero
  count, at most the largest multiple of the row size), kept by torch.topk."""
  loga = torch.tensor(loga, dtype=torch.float64)
  soft = torch.sigmoid(loga / (2 / 3) * 0.8)
  x = (0 - (-0.1)) / (1.1 - (-0.1))
  cdf = torch.clamp(torch.sigmoid(math.log(x / (1 - x)) * (2 / 3) - loga), 1e-6, 1 - 1e-6)
  size = loga.numel()
  kept = size - round(size - float((1 - cdf).sum()))
  top = size // m * m
  want = math.floor(kept / m + 0.5) * m
  want = min(m if want == 0 and kept > 0 else want, top)
  out = torch.zeros_like(soft)
  idx = torch.topk(soft, want).indices
  out[idx] = soft[idx]
  return out.numpy()


def test_rounding_keeps_the_top_scoring_units_at_a_multiple_of_the_axis():
  rng = np.random.default_rng(0)
  logas = {"visual": {"hidden": rng.uniform(-4, 4, (98,)).astype(np.float32),
                      "heads": rng.uniform(-4, 4, (3, 6)).astype(np.float32),
                      "intermediate": rng.uniform(-3, 5, (3, 103)).astype(np.float32)}}
  valid = {"visual": {k: np.ones(v.shape, bool) for k, v in logas["visual"].items()}}
  multiples = {"hidden": 4, "heads": 2, "intermediate": 8}
  gates = masks.deterministic_gates(logas, valid, multiples)["visual"]
  plain = masks.deterministic_gates(logas, valid)["visual"]
  changed = 0
  for kind, m in multiples.items():
    rows_l = np.atleast_2d(logas["visual"][kind])
    rows_g, rows_p = np.atleast_2d(np.asarray(gates[kind])), np.atleast_2d(np.asarray(plain[kind]))
    for loga, got, unrounded in zip(rows_l, rows_g, rows_p):
      want = reference_gates(loga, m)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
      assert np.count_nonzero(got) % m == 0 and np.count_nonzero(got) > 0
      changed += np.count_nonzero(got) != np.count_nonzero(unrounded)
  assert changed >= 3  # the draw exercises the rounding, not only kept counts already at m


def masked_config(round_to):
  c = smoke.get_config()
  c.mesh.update(MESH)
  c.masks.enabled = True
  c.masks.round_to = round_to
  return c


def test_round_to_takes_the_mesh_axis_each_kind_is_sharded_over(caplog):
  assert masking.round_multiples(masked_config(-1)) == {"hidden": 4, "heads": 2,
                                                        "intermediate": 2}
  assert masking.round_multiples(masked_config(8)) == {"hidden": 8, "heads": 8,
                                                       "intermediate": 8}
  with caplog.at_level(logging.WARNING):
    assert masking.round_multiples(masked_config(0)) == {}
  assert "masks.round_to=-1" in caplog.text  # warned at setup: widths known at the prune
  with pytest.raises(ValueError, match="masks.round_to -2 is invalid"):
    masking.check(masked_config(-2), ValueError)


@pytest.mark.parametrize("field, value, words", [
    ("replication", "stop", "mesh.replication 'stop' is unknown"),
    ("max_replicated_fraction", 1.5, "must lie in [0, 1]"),
])
def test_bad_guard_fields_fail_validation(field, value, words):
  from tinyclip_jax.train import prepare  # pylint: disable=import-outside-toplevel
  c = smoke.get_config()
  c.mesh[field] = value
  with pytest.raises(prepare.SetupError, match=re.escape(words)):
    prepare.validate(c)


def test_the_prune_step_check_names_round_to():
  c = masked_config(0)
  c.mesh.replication = "error"
  mesh = parallel.make_mesh(MESH)
  with pytest.raises(parallel.ReplicationError, match=r"the pruned student: .*masks.round_to=-1"):
    masking.check_pruned(c, tiny_model(), mesh)
  c.mesh.replication = "warn"
  assert "masks.round_to=-1" in masking.check_pruned(c, tiny_model(), mesh)


def test_cli_stops_with_exit_2_before_training_a_replicated_student(tmp_path):
  # smoke's student has one 32-wide head per layer: tensor=2 cannot split it.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  workdir = tmp_path / "run"
  p = subprocess.run(
      [sys.executable, "-m", "tinyclip_jax.main", "--config=configs/smoke.py",
       f"--workdir={workdir}", "--config.mesh.data=-1", "--config.mesh.fsdp=2",
       "--config.mesh.tensor=2", "--config.mesh.replication=error",
       "--config.mesh.max_replicated_fraction=0.0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  error = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and error[0].startswith("error: student: ")
  assert "in_proj_kernel" in error[0] and "mesh.max_replicated_fraction" in error[0]
  assert not (workdir / "checkpoints").exists()


def test_a_run_stops_at_the_prune_step_before_training_a_replicated_student(tmp_path):
  """Masked on fsdp=2 × tensor=2 with nothing replicated allowed (the masked
  student, a copy of the 64-wide teacher, divides): the prune's widths do not, so the
  run stops before the pruned phase is built or compiled, with no checkpoint past the
  masked phase's (a resume with masks.round_to=-1 redoes the prune step)."""
  from test_auto_inherit import auto_config  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import runner  # pylint: disable=import-outside-toplevel
  from test_train import mesh_on  # pylint: disable=import-outside-toplevel
  c = auto_config()
  c.mesh.update(data=-1, fsdp=2, tensor=2, replication="error", max_replicated_fraction=0.0)
  with pytest.MonkeyPatch.context() as mp, pytest.raises(
      parallel.ReplicationError, match="the pruned student: .*masks.round_to=-1"):
    mesh_on(mp, jax.devices()[:4])  # 4 devices compile faster than 8
    runner.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert not (tmp_path / "export").exists()
