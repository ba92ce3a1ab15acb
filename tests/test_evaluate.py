"""Zero-shot evaluation against a PyTorch spelling of CLIP's zero-shot recipe."""
import json
import os

import jax
import numpy as np
import torch

from tinyclip_jax import evaluate, model_io, tokenizer
from tinyclip_jax.eval import zeroshot
from tinyclip_jax.models import CLIPConfig, init_params, text_tower, vision_tower


def tiny():
  return CLIPConfig(16, vision_tower(32, 1, 8, image_size=32, head_dim=16),
                    text_tower(32, 1, head_dim=16, context_length=32))


def test_classifier_and_accuracy_match_torch():
  rng = np.random.default_rng(0)
  classes = ["red circle", "blue square", "green star", "pink ring", "grey cross", "tan moon"]
  prompts = lambda c: [f"a photo of a {c}.", f"a drawing of a {c}."]
  table = {}

  def encode_text(tokens):  # a deterministic stand-in encoder: one vector per token row
    out = []
    for row in np.asarray(tokens):
      key = tuple(row.tolist())
      table.setdefault(key, rng.standard_normal(8).astype(np.float32))
      out.append(table[key])
    return np.stack(out)

  clf = zeroshot.classifier(encode_text, classes, prompts, 32, batch=4)
  # Reference: CLIP's recipe in torch — normalize each prompt, mean per class, renormalize.
  ids = tokenizer.tokenize([p for c in classes for p in prompts(c)], 32)
  emb = torch.tensor(np.stack([table[tuple(r.tolist())] for r in ids])).reshape(6, 2, 8)
  emb = emb / emb.norm(dim=-1, keepdim=True)
  ref = emb.mean(1)
  ref = ref / ref.norm(dim=-1, keepdim=True)
  # encode_text returns raw vectors here, so normalize them as the real encoder does
  clf_norm = zeroshot.classifier(
      lambda t: (lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True))(encode_text(t)),
      classes, prompts, 32, batch=4)
  np.testing.assert_allclose(clf_norm, ref.numpy(), atol=1e-6)
  assert clf.shape == (6, 8)

  images = rng.standard_normal((10, 8)).astype(np.float32)
  labels = rng.integers(0, 6, 10).astype(np.int32)
  acc = zeroshot.accuracy(lambda x: x, clf_norm, images, labels, batch=3)
  logits = torch.tensor(images) @ ref.T
  top5 = logits.topk(5, dim=-1).indices
  t = torch.tensor(labels)
  assert acc["top1"] == float((logits.argmax(-1) == t).double().mean())
  assert acc["top5"] == float((top5 == t[:, None]).any(-1).double().mean())


def test_cli_on_synthetic_and_folder(tmp_path, capsys):
  cfg = tiny()
  model_io.save_model(str(tmp_path / "m"), init_params(cfg, jax.random.key(0)), cfg)
  out = tmp_path / "eval.json"
  assert evaluate.main([f"--checkpoint={tmp_path / 'm'}", "--dataset=synthetic",
                        "--num_examples=32", f"--output={out}"]) == 0
  metrics = json.loads(out.read_text())
  assert set(metrics) == {"top1", "top5", "colour_top1", "shape_top1"}
  assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
  assert metrics["top1"] <= min(metrics["colour_top1"], metrics["shape_top1"])

  from tinyclip_jax.data import synthetic
  assert synthetic.main(["--split=eval", "--num=16", f"--out={tmp_path / 'd'}",
                         "--image_size=32"]) == 0
  assert evaluate.main([f"--checkpoint={tmp_path / 'm'}",
                        f"--dataset=folder:{tmp_path / 'd'}"]) == 0
  assert "top1" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
  assert evaluate.main([f"--checkpoint={tmp_path / 'nope'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and len(err.strip().splitlines()) == 1
  cfg = tiny()
  model_io.save_model(str(tmp_path / "m"), init_params(cfg, jax.random.key(0)), cfg)
  assert evaluate.main([f"--checkpoint={tmp_path / 'm'}", "--dataset=imagenet9"]) == 2
  assert "unknown" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "eval.json")
