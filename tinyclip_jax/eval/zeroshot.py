"""Zero-shot classification: a classifier from class names × prompt templates (mean
of normalized text embeddings, renormalized), top-1/top-5 accuracy.

Tasks: the embedded ones held in memory (`synthetic`, the generated labelled split;
`folder:PATH`, images + labels.json) and TFDS datasets streamed a batch at a time
(imagenet2012, imagenet_v2, cifar10, cifar100; class names and templates in
metadata.py).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from tinyclip_jax import preprocess
from tinyclip_jax.eval import encode, metadata


class Task(NamedTuple):
  """An embedded task, loaded once: normalized float NHWC images and their labels."""
  images: np.ndarray
  labels: np.ndarray
  classes: list[str]
  prompts: Callable[[str], Sequence[str]]
  # Optional factors of the class label, e.g. {"shape": (num_classes,) int}: the top-1
  # guess counts for FACTOR_top1 when it has the true class's factor (colour right,
  # shape wrong still scores colour_top1), so a reader sees what a model has learned.
  factors: dict[str, np.ndarray] | None = None


def classifier(encode_text: Callable, classnames: Sequence[str],
               prompts: Callable[[str], Sequence[str]], context_length: int,
               batch: int = 256) -> np.ndarray:
  """(num_classes, embed_dim) unit vectors."""
  texts = [p for c in classnames for p in prompts(c)]
  per_class = len(prompts(classnames[0]))
  emb = encode.embed_texts(encode_text, texts, context_length, batch)
  emb = emb.reshape(len(classnames), per_class, -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """top1/top5 in [0, 1] of (n, num_classes) logits (top-k = top-all below 5 classes)."""
  k = min(5, logits.shape[1])
  topk = np.argsort(-logits, axis=-1)[:, :k]
  hits = topk == np.asarray(labels)[:, None]
  return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(axis=-1).mean())}


def factor_accuracy(logits: np.ndarray, labels: np.ndarray,
                    factors: dict[str, np.ndarray]) -> dict[str, float]:
  """{FACTOR_top1}: the fraction of top-1 guesses whose class shares the label's factor."""
  guess = np.argmax(logits, axis=-1)
  return {f"{name}_top1": float(np.mean(f[guess] == f[np.asarray(labels)]))
          for name, f in factors.items()}


def accuracy(encode_image: Callable, classifier_: np.ndarray, images: np.ndarray,
             labels: np.ndarray, batch: int = 256, factors=None) -> dict[str, float]:
  """images: normalized float NHWC. Returns top1/top5 in [0, 1] (and factor top-1s)."""
  logits = encode.embed_array(encode_image, images, batch) @ classifier_.T
  return {**topk_accuracy(logits, labels), **factor_accuracy(logits, labels, factors or {})}


def synthetic_task(num_examples: int, image_size: int, seed: int = 0, **appearance) -> Task:
  """The embedded generated zero-shot split (uint8 images normalized here), with its
  colour and shape factors; `appearance`: synthetic.appearance(data config)."""
  from tinyclip_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  spec = synthetic.SyntheticSpec(image_size=image_size, seed=seed, **appearance)
  images, labels = synthetic.make_zeroshot(spec, num_examples)
  return Task(preprocess.normalize(images), labels, synthetic.zeroshot_classes(spec),
              synthetic.zeroshot_prompts, synthetic.zeroshot_factors(spec))


def folder_task(path: str, image_size: int) -> Task:
  """A folder (local or gs://) of images + labels.json ({"classes": [prompt], "labels":
  {file: idx}})."""
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  meta_path = storage.join(path, "labels.json")
  if not storage.exists(meta_path):
    raise FileNotFoundError(f"{meta_path} does not exist; a dataset folder needs images and a "
                            "labels.json (python -m tinyclip_jax.data.synthetic writes one).")
  meta = storage.read_json(meta_path)
  files = sorted(meta["labels"])
  images = np.stack([preprocess.load_image(storage.read_bytes(storage.join(path, n)), image_size)
                     for n in files])
  labels = np.array([meta["labels"][n] for n in files], np.int32)
  return Task(images, labels, list(meta["classes"]), lambda c: [c])


def load_task(spec: str, image_size: int, num_examples: int = 512, seed: int = 0,
              **appearance) -> Task:
  """The embedded task `synthetic` (drawn with the training data's `appearance`) or
  `folder:PATH`."""
  if spec == "synthetic":
    return synthetic_task(num_examples, image_size, seed, **appearance)
  if spec.startswith("folder:"):
    return folder_task(spec[len("folder:"):], image_size)
  raise ValueError(f"dataset {spec!r} is unknown; use 'synthetic' or 'folder:PATH'.")


def evaluate_task(task: Task, encoders, context_length: int, batch: int) -> dict[str, float]:
  enc_img, enc_txt = encoders
  clf = classifier(enc_txt, task.classes, task.prompts, context_length, batch)
  return accuracy(enc_img, clf, task.images, task.labels, batch, task.factors)


def evaluate_tfds(name: str,
                  split: str,
                  encoders,
                  size: int,
                  context_length: int,
                  *,
                  data_dir: str = "",
                  batch: int = 256,
                  max_examples: int = 0) -> dict:
  """Zero-shot on a TFDS split, streamed: only the image embeddings are kept."""
  from tinyclip_jax.data import tfds_input  # pylint: disable=import-outside-toplevel
  _, entry, label_key = metadata.ZEROSHOT[name]
  examples, b = tfds_input.eval_examples(name, split, data_dir, {
      "image": "image",
      "label": label_key
  }, max_examples)
  classes = metadata.classes(entry)
  if b.info.features[label_key].num_classes != len(classes):
    raise ValueError(f"TFDS {name} has {b.info.features[label_key].num_classes} classes but "
                     f"the {entry} metadata has {len(classes)}.")
  enc_img, enc_txt = encoders
  clf = classifier(enc_txt, classes, metadata.prompts(entry), context_length, batch)
  embs, labels = [], []
  for chunk in encode.chunks(examples, batch):
    embs.append(encode.embed_encoded(enc_img, [ex["image"] for ex in chunk], size, batch))
    labels.extend(int(ex["label"]) for ex in chunk)
  emb = np.concatenate(embs)
  return {**topk_accuracy(emb @ clf.T, np.asarray(labels)), "num_examples": len(labels)}
