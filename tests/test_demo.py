"""The demo: every artefact the README promises (checked on the run in
tests/test_run_plan.py), the data behind its pictures recomputed in PyTorch, and its
bad input."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from tinyclip_jax import demo, demo_probe, model_io, preprocess, tokenizer
from tinyclip_jax.convert import hf as hf_convert
from tinyclip_jax.data import synthetic
from tinyclip_jax.train import prepare

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import demo as demo_config  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _hf_model(checkpoint):
  """The exported model as a transformers CLIPModel (the independent reference)."""
  from transformers import CLIPConfig as HFConfig, CLIPModel  # pylint: disable=import-outside-toplevel
  params, cfg = model_io.load_model(checkpoint)
  sd, hf_cfg = hf_convert.to_hf(params, cfg)
  model = CLIPModel(HFConfig.from_dict(hf_cfg)).eval()
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v))
                                               for k, v in sd.items()}, strict=False)
  assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
  return model, cfg


def _features(x):  # transformers 5 may return a model output instead of a tensor
  x = (x.pooler_output if hasattr(x, "pooler_output") else x).detach().numpy()
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _torch_embed(model, cfg, pixels, texts):
  with torch.no_grad():
    img = model.get_image_features(
        pixel_values=torch.from_numpy(preprocess.normalize(pixels).transpose(0, 3, 1, 2)))
    ids = tokenizer.tokenize(texts, cfg.text.context_length)
    txt = model.get_text_features(input_ids=torch.from_numpy(ids).long())
  return _features(img), _features(txt)


def check_probe(probe: dict, checkpoints: dict, affinity: bool = True) -> None:
  """summary.json's guesses and affinity matrices against transformers' CLIPModel of
  each exported model: zero-shot classifiers (mean of the 8 prompts' unit embeddings,
  renormalized) and softmax(τ · image · text) spelled out here in torch."""
  spec = synthetic.SyntheticSpec(**probe["spec"])
  pixels = np.stack([synthetic.make_batch(spec, "zeroshot", i, 1)["images"][0]
                     for i in probe["indices"]])
  assert probe["labels"] == [i % 64 for i in probe["indices"]]
  classes = synthetic.zeroshot_classes()
  prompts = [p for c in classes for p in synthetic.zeroshot_prompts(c)]
  embeds = {}
  for name in probe["guesses"]:
    model, cfg = _hf_model(checkpoints[name])
    img, txt = _torch_embed(model, cfg, pixels, prompts)
    clf = txt.reshape(len(classes), -1, txt.shape[-1]).mean(1)
    clf /= np.linalg.norm(clf, axis=-1, keepdims=True)
    assert probe["guesses"][name] == np.argmax(img @ clf.T, -1).tolist(), name
    embeds[name] = (model, cfg, img)
  if not affinity:
    assert "affinity" not in probe
    return
  a = probe["affinity"]
  assert a["indices"] == list(range(len(a["texts"])))
  batch = np.stack([synthetic.make_batch(spec, "zeroshot", i, 1)["images"][0]
                    for i in a["indices"]])
  assert a["texts"] == [f"a photo of {'an' if classes[i][0] in 'aeiou' else 'a'} {classes[i]}."
                        for i in a["indices"]]
  for who in ("teacher", "distilled"):
    model, cfg, _ = embeds[a["models"][who]]
    img, txt = _torch_embed(model, cfg, batch, a["texts"])
    want = torch.softmax(a["scale"][who] * torch.from_numpy(img @ txt.T), -1).numpy()
    assert np.abs(np.array(a[who]) - want).max() < 1e-5, who  # f32 softmax of unit vectors


def check_demo_artefacts(workdir, steps: int, seeds: int, ablation: bool) -> None:
  """Every artefact the README promises, in a finished demo's folder (the demo runs in
  tests/test_run_plan.py, killed once and resumed: one run for both)."""
  s = json.loads((workdir / "summary.json").read_text())
  assert s["steps"] == steps and s["seeds"] == list(range(seeds))
  students = [f"{k}_s{i}" for i in range(seeds) for k in ("distilled", "scratch")]
  names = ["teacher", *students, *(["inherit_clip_s0"] if ablation else [])]
  assert sorted(s["rows"]) == sorted(names)
  for name in names:
    row = s["rows"][name]
    params, _ = model_io.load_model(row["checkpoint"])
    assert row["params"] == sum(x.size for x in __import__("jax").tree.leaves(params))
    # The final row is the stage's last evaluation, which is of its exported step.
    hist = s["history"].get(name) or [json.loads(p.read_text()) for p in sorted(
        (workdir / os.path.basename(os.path.dirname(row["checkpoint"])) / "evals").iterdir())]
    assert {k: row[k] for k in ("top1", "top5", "shape_top1", "colour_top1")} == {
        k: hist[-1][k] for k in ("top1", "top5", "shape_top1", "colour_top1")}
  rows = s["rows"]
  assert rows["distilled_s0"]["params"] == rows["scratch_s0"]["params"] < rows["teacher"]["params"]
  evals = list(range(2, steps + 1, 2))
  for name in students:
    assert [h["step"] for h in s["history"][name]] == evals
  # Means and per-seed comparison, recomputed from the histories.
  for kind in ("distilled", "scratch"):
    assert s[kind]["top1"] == pytest.approx(
        np.mean([rows[f"{kind}_s{i}"]["top1"] for i in range(seeds)]), abs=1e-12)
  c = s["comparison"]
  for i, p in enumerate(c["per_seed"]):
    d, sc = s["history"][f"distilled_s{i}"], s["history"][f"scratch_s{i}"]
    target = sc[-1]["top1"]
    at = next((h["step"] for h in d if h["top1"] >= target), None)
    assert p["reached_scratch_at"] == at and p["gain"] == pytest.approx(d[-1]["top1"] - target)
    quarter = [h["top1"] for h in sc if h["step"] <= 0.75 * steps]
    assert p["scratch_last_quarter_gain"] == pytest.approx(sc[-1]["top1"] - quarter[-1])
  assert c["mean_gain"] == pytest.approx(np.mean([p["gain"] for p in c["per_seed"]]))
  assert set(s["seconds"]) >= {*names, "pictures", "this_run"}
  check_probe(s["probe"], {k: rows[k]["checkpoint"] for k in rows})
  for picture in ("top1.png", "guesses.png", "affinity.png"):
    assert (workdir / picture).read_bytes()[:8] == PNG


def test_reached_at():
  hist = [{"step": 10, "top1": 0.1}, {"step": 20, "top1": 0.3}, {"step": 30, "top1": 0.2}]
  assert demo.reached_at(hist, 0.25) == 20
  assert demo.reached_at(hist, 0.1) == 10
  assert demo.reached_at(hist, 0.5) is None


def test_compare_by_hand():
  h = lambda *t: [{"step": 10 * (i + 1), "top1": v} for i, v in enumerate(t)]  # noqa: E731
  hist = {"distilled_s0": h(0.2, 0.5, 0.6, 0.7), "scratch_s0": h(0.1, 0.2, 0.3, 0.35),
          "distilled_s1": h(0.1, 0.2, 0.3, 0.4), "scratch_s1": h(0.3, 0.4, 0.45, 0.5)}
  rows = {k: {"top1": v[-1]["top1"]} for k, v in hist.items()}
  c = demo.compare(rows, hist, 2, 40)
  assert [p["reached_scratch_at"] for p in c["per_seed"]] == [20, None]
  assert [p["fraction_of_steps"] for p in c["per_seed"]] == [0.5, None]
  assert c["per_seed"][0]["gain"] == pytest.approx(0.35)
  assert c["per_seed"][1]["scratch_last_quarter_gain"] == pytest.approx(0.05)  # 0.5 - 0.45
  assert c["mean_gain"] == pytest.approx((0.35 - 0.1) / 2)
  assert c["mean_fraction_of_steps"] is None
  assert not c["every_seed_gains"] and not c["every_seed_within_half"]


def test_stages_per_seed_ablation_and_long_scratch():
  c = demo_config.get_config()
  names = [s["name"] for s in demo.stages(c)]
  seeds = c.demo.seeds
  assert names == ["teacher", *[f"{k}_s{i}" for i in range(seeds) for k in ("distilled",
                                                                          "scratch")],
                   "inherit_clip_s0", "scratch_long_s0"]
  by = {s["name"]: s for s in demo.stages(c)}
  assert by["scratch_s1"]["seed"] == by["scratch_s1"]["data"]["seed"] == 1
  assert by["inherit_clip_s0"]["student"]["init"] == "inherit"
  assert by["inherit_clip_s0"]["loss"]["alpha"] == 0.0  # no affinity mimicking
  assert by["scratch_long_s0"]["total_steps"] == 2 * c.total_steps


def test_demo_needs_the_synthetic_task(tmp_path):
  c = demo_config.get_config()
  c.eval.tasks = "cifar10"
  with pytest.raises(prepare.SetupError, match="eval.tasks 'cifar10': .* keep 'synthetic' in it"):
    demo.run(c, str(tmp_path / "demo"))
  assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("field,value,match", [
    ("seeds", 0, r"demo.seeds=0: .* give at least 1"),
    ("grid", 0, r"demo.grid=0 must be in \[1, 64\]"),
    ("affinity", 65, r"demo.affinity=65 must be in \[1, 8\] \(one colour's shapes"),
    ("affinity", 9, r"demo.affinity=9 must be in \[1, 8\] \(one colour's shapes")])
def test_bad_demo_fields_are_one_sentence(tmp_path, field, value, match):
  c = demo_config.get_config()
  c.demo[field] = value
  with pytest.raises(prepare.SetupError, match=match):
    demo.run(c, str(tmp_path / "demo"))
  assert not (tmp_path / "demo").exists()


def test_probe_images_cover_every_colour_and_shape():
  c = demo_config.get_config()
  _, labels, idx = demo_probe.images(c, 16)
  assert idx == [9 * i for i in range(16)]
  f = synthetic.zeroshot_factors()
  assert set(f["colour"][labels]) == set(range(8)) and set(f["shape"][labels]) == set(range(8))
