"""Evaluation tasks by name: zero-shot classification on TFDS datasets (imagenet2012,
imagenet_v2, cifar10, cifar100) and image–text retrieval on TFDS coco_captions or
webdataset shards (`wds:PATTERN`, captions one per line of KEY.txt), plus the
embedded `synthetic` and `folder:PATH` tasks of tinyclip_jax.evaluate.

Images are preprocessed exactly as CLIP evaluates (tinyclip_jax.preprocess: PIL
bicubic resize of the shorter side, centre crop, mean/std) on a thread pool, and
streamed: only embeddings are kept, so ImageNet's 50k images never sit in memory.
With a mesh, every batch is sharded over its data axes (each process supplies its
rows), so the encoders run on all devices of all hosts.
"""
from __future__ import annotations

import json
import os
from concurrent import futures
from typing import Callable, Iterable

import jax
import numpy as np

from tinyclip_jax import evaluate, parallel, preprocess, storage, tokenizer
from tinyclip_jax import workdir as workdir_lib
from tinyclip_jax.eval import metadata, retrieval



def parse(spec: str) -> tuple[str, str, str]:
  """'cifar10' → ("zeroshot", "cifar10", "test"); 'coco_captions:val' →
  ("retrieval", "coco_captions", "val"); 'wds:PATTERN' → ("wds", PATTERN, "")."""
  if spec == "synthetic" or spec.startswith("folder:"):
    return "embedded", spec, ""
  if spec.startswith("wds:"):
    return "wds", spec[len("wds:"):], ""
  name, _, split = spec.partition(":")
  if name in metadata.ZEROSHOT:
    return "zeroshot", name, split or metadata.ZEROSHOT[name][0]
  if name in metadata.RETRIEVAL:
    return "retrieval", name, split or metadata.RETRIEVAL[name][0]
  known = ["synthetic", "folder:PATH", *metadata.ZEROSHOT, *metadata.RETRIEVAL, "wds:PATTERN"]
  raise ValueError(f"eval task {spec!r} is unknown; use one of {', '.join(known)} "
                   "(NAME:SPLIT picks a TFDS split).")


def decode(encoded: list[bytes], size: int) -> np.ndarray:
  """Encoded images → CLIP-preprocessed float32 (n, size, size, 3), decoded by
  tinyclip_jax.data.decode's rule (the one training uses)."""
  workers = max(1, min(16, os.cpu_count() or 1, len(encoded)))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:  # ended with the batch
    return np.stack(list(pool.map(lambda b: preprocess.load_image(bytes(b), size), encoded)))


def on_mesh(fn: Callable, mesh) -> Callable:
  """fn over a host batch, sharded over the mesh's data axes; returns numpy."""
  if mesh is None:
    return lambda x: np.asarray(fn(x))
  count, index = jax.process_count(), jax.process_index()

  def run(x):
    x = np.asarray(x)
    rows = len(x) // count
    arr = jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh, x.ndim), x[index * rows:(index + 1) * rows], x.shape)
    out = fn(arr)
    if count == 1:
      return np.asarray(out)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  return run


def _chunks(it: Iterable, n: int):
  chunk = []
  for x in it:
    chunk.append(x)
    if len(chunk) == n:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  k = min(5, logits.shape[1])
  topk = np.argsort(-logits, axis=-1)[:, :k]
  hits = topk == np.asarray(labels)[:, None]
  return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(axis=-1).mean())}


def _embed_images(encode_image, encoded: list[bytes], size: int, batch: int) -> np.ndarray:
  images = decode(encoded, size)
  return evaluate.batched(encode_image, len(images), lambda a, b: images[a:b], batch)


def _embed_texts(encode_text, texts: list[str], context_length: int, batch: int) -> np.ndarray:
  tokens = tokenizer.tokenize(texts, context_length)
  return evaluate.batched(encode_text, len(tokens), lambda a, b: tokens[a:b], batch)


def zeroshot_tfds(name: str,
                  split: str,
                  encoders,
                  size: int,
                  context_length: int,
                  *,
                  data_dir: str = "",
                  batch: int = 256,
                  max_examples: int = 0) -> dict:
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
  classifier = evaluate.zeroshot_classifier(enc_txt, classes, metadata.prompts(entry),
                                            context_length, batch)
  embs, labels = [], []
  for chunk in _chunks(examples, batch):
    embs.append(_embed_images(enc_img, [ex["image"] for ex in chunk], size, batch))
    labels.extend(int(ex["label"]) for ex in chunk)
  emb = np.concatenate(embs)
  return {**topk_accuracy(emb @ classifier.T, np.asarray(labels)), "num_examples": len(labels)}


def _retrieval(pairs: Iterable[tuple[bytes, list[str]]], encoders, size, context_length,
               batch) -> dict:
  enc_img, enc_txt = encoders
  embs, texts, text_image, n = [], [], [], 0
  for chunk in _chunks(pairs, batch):
    embs.append(_embed_images(enc_img, [image for image, _ in chunk], size, batch))
    for _, captions in chunk:
      texts.extend(captions)
      text_image.extend([n] * len(captions))
      n += 1
  if not n:
    raise ValueError("the retrieval set is empty.")
  text_emb = _embed_texts(enc_txt, texts, context_length, batch)
  return {
      **retrieval.recall_at_k(np.concatenate(embs), text_emb, np.asarray(text_image)), "num_images":
          n,
      "num_texts":
          len(texts)
  }


def retrieval_tfds(name: str,
                   split: str,
                   encoders,
                   size: int,
                   context_length: int,
                   *,
                   data_dir: str = "",
                   batch: int = 256,
                   max_examples: int = 0) -> dict:
  from tinyclip_jax.data import tfds_input  # pylint: disable=import-outside-toplevel
  _, caption_key = metadata.RETRIEVAL[name]
  examples, _ = tfds_input.eval_examples(name, split, data_dir, {
      "image": "image",
      "captions": caption_key
  }, max_examples)
  pairs = ((ex["image"], [c.decode("utf-8", "replace")
                          for c in ex["captions"]])
           for ex in examples
           if len(ex["captions"]))
  return _retrieval(pairs, encoders, size, context_length, batch)


def wds_pairs(pattern: str, max_examples: int = 0):
  """(image bytes, captions) of webdataset shards in file order; bad samples skipped,
  undecodable images included (the header check alone passes a cut-off JPEG, and one
  bad file must not stop a periodic evaluation)."""
  from tinyclip_jax.data import captions as lines  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.data import decode, shards  # pylint: disable=import-outside-toplevel
  n = 0
  for path in shards.resolve(pattern, "eval task wds:"):
    for _, image, caption, reason in shards.read_tar(path, 1, 2**62):
      captions = [c.strip() for c in lines.split_lines(caption.decode("utf-8", "replace"))]
      captions = [c for c in captions if c]
      if reason or not captions or not _decodable(decode, image):
        continue
      yield image, captions
      n += 1
      if n == max_examples:
        return


def _decodable(decode, image: bytes) -> bool:
  try:
    decode.open_rgb(image)
    return True
  except Exception:  # noqa: BLE001 - PIL raises many types on broken files
    return False


def run(spec: str,
        model_config,
        params,
        *,
        data_dir: str = "",
        batch: int = 256,
        max_examples: int = 0,
        num_examples: int = 512,
        seed: int = 0,
        mesh=None) -> dict:
  """Metrics of one task for these params."""
  kind, name, split = parse(spec)
  size, ctx = model_config.vision.image_size, model_config.text.context_length
  if mesh is not None:  # a batch of whole rows per data-parallel device
    per = parallel.batch_size_per_axis(mesh)
    batch = -(-batch // per) * per
  img, txt = evaluate.encoders(model_config, params)
  encoders = (on_mesh(img, mesh), on_mesh(txt, mesh))
  if kind == "embedded":
    task = evaluate.load_task(name, size, num_examples, seed)
    images, labels, classes, prompts = task
    classifier = evaluate.zeroshot_classifier(encoders[1], classes, prompts, ctx, batch)
    emb = evaluate.batched(encoders[0], len(images), lambda a, b: images[a:b], batch)
    return topk_accuracy(emb @ classifier.T, labels)
  kw = dict(data_dir=data_dir, batch=batch, max_examples=max_examples)
  if kind == "zeroshot":
    return zeroshot_tfds(name, split, encoders, size, ctx, **kw)
  if kind == "retrieval":
    return retrieval_tfds(name, split, encoders, size, ctx, **kw)
  return _retrieval(wds_pairs(name, max_examples), encoders, size, ctx, batch)


def task_list(tasks: str) -> list[str]:
  """'cifar10, coco_captions' → ['cifar10', 'coco_captions'], each checked."""
  out = [t.strip() for t in tasks.split(",") if t.strip()]
  for t in out:
    parse(t)
  return out


def write_result(workdir: str, step: int, metrics: dict) -> str | None:
  """WORKDIR/evals/step_NNNNNNNN.json (process 0; written whole, then renamed)."""
  if jax.process_index() != 0:
    return None
  text = json.dumps({"step": step, **metrics}, indent=2)
  path = workdir_lib.eval_result(workdir, step)
  storage.write_text(path, text)  # one object / temp + rename: never half-written
  return path
