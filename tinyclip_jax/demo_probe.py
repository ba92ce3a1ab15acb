"""What the demo's pictures show, computed from the exported models and kept in
summary.json (so a reader, or a test, can check a picture's numbers):

  guesses   for `demo.grid` eval images (zero-shot split indices 0, 9, 18, …: each
            colour and shape appears), every model's top-1 class;
  affinity  for a batch of `demo.affinity` eval images of one colour (split indices
            0, 1, …: the first colour's shapes, so that colour gives nothing away) and
            their classes' captions, the teacher's and the distilled student's
            image→text affinity softmax(τ · image · text) over the batch's captions, at
            the temperatures the affinity loss uses (loss.teacher_scale,
            loss.student_scale).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tinyclip_jax import model_io, preprocess, tokenizer, workdir as workdir_lib
from tinyclip_jax.data import synthetic
from tinyclip_jax.eval import encode, zeroshot

STRIDE = 9  # coprime with the 64 classes: indices 0, 9, 18, … cover every colour and shape


def spec(config) -> synthetic.SyntheticSpec:
  """The eval task's generator (eval/zeroshot.synthetic_task): seed 0, the data's scale."""
  return synthetic.SyntheticSpec(image_size=int(config.teacher.custom.image_size),
                                 **synthetic.appearance(config.data))


def images(config, count: int, stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """uint8 images, labels and eval-split indices 0, stride, 2·stride, …"""
  idx = [stride * i for i in range(count)]
  out = [synthetic.make_batch(spec(config), "zeroshot", i, 1) for i in idx]
  return (np.stack([b["images"][0] for b in out]),
          np.array([b["attributes"][0]["label"] for b in out]), idx)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def run(config, results: dict, models: tuple[str, ...], affinity: bool = True) -> dict:
  """{"spec" (the generator's), "indices", "labels", "classes", "guesses": {model:
  [class]}, "affinity": {"indices", "texts", "scale", "models", "teacher", "distilled"}}."""
  d = config.demo
  pixels, labels, idx = images(config, int(d.grid))
  classes = synthetic.zeroshot_classes()
  out = {"spec": dataclasses.asdict(spec(config)), "indices": idx, "labels": labels.tolist(),
         "classes": classes, "guesses": {}}
  embedded = {}
  for m in models:
    params, cfg = model_io.load_model(results[m]["checkpoint"])
    enc_img, enc_txt = encode.encoders(cfg, params)
    ctx = cfg.text.context_length
    clf = zeroshot.classifier(enc_txt, classes, synthetic.zeroshot_prompts, ctx)
    img = encode.embed_array(enc_img, preprocess.normalize(pixels), 256)
    out["guesses"][m] = np.argmax(img @ clf.T, axis=-1).tolist()
    embedded[m] = (enc_img, enc_txt, ctx)
  if affinity:
    batch, batch_labels, batch_idx = images(config, int(d.affinity), stride=1)
    texts = [synthetic.zeroshot_prompts(classes[y])[0] for y in batch_labels]
    student = next(m for m in models if m != "teacher")
    scales = {"teacher": float(config.loss.teacher_scale),
              "distilled": float(config.loss.student_scale)}
    a = {"indices": batch_idx, "texts": texts, "scale": scales,
         "models": {"teacher": "teacher", "distilled": student}}
    for who, m in (("teacher", "teacher"), ("distilled", student)):
      enc_img, enc_txt, ctx = embedded[m]
      img = encode.embed_array(enc_img, preprocess.normalize(batch), 256)
      txt = encode.embed_array(enc_txt, tokenizer.tokenize(texts, ctx), 256)
      a[who] = softmax(scales[who] * img @ txt.T).tolist()
    out["affinity"] = a
  return out


def draw(workdir: str, summary: dict) -> None:
  """top1.png, guesses.png and affinity.png from summary.json's data."""
  from tinyclip_jax import demo_figures as fig  # pylint: disable=import-outside-toplevel
  probe = summary["probe"]
  students = {k: v for k, v in summary["history"].items() if k != "auto"}  # demo_auto's own
  fig.curves(workdir_lib.plot(workdir, "top1.png"), students, summary["rows"]["teacher"]["top1"])
  fig.guesses(workdir_lib.plot(workdir, "guesses.png"), _pixels(summary, probe), probe,
              ("teacher", "distilled_s0", "scratch_s0"))
  fig.affinity(workdir_lib.plot(workdir, "affinity.png"), probe)


def draw_auto(workdir: str, summary: dict, results: dict) -> None:
  """auto.png: the automatic student's and the teacher's guesses beside its structure."""
  from tinyclip_jax import demo_figures as fig  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.inherit import prune  # pylint: disable=import-outside-toplevel
  probe = summary["probe_auto"]
  full = prune.structure(results["teacher"]["config"])
  fig.guesses(workdir_lib.plot(workdir, "auto.png"), _pixels(summary, probe), probe,
              ("teacher", "auto"), extra=fig.structure_panel(summary["auto"]["structure"], full))


def _pixels(summary: dict, probe: dict) -> np.ndarray:
  s = synthetic.SyntheticSpec(**probe["spec"])
  return np.stack([synthetic.make_batch(s, "zeroshot", i, 1)["images"][0]
                   for i in probe["indices"]])
