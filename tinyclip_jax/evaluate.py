"""Zero-shot classification: a classifier from class names × prompt templates
(mean of normalized text embeddings, renormalized), top-1/top-5 accuracy.

Standalone: python -m tinyclip_jax.evaluate --checkpoint=DIR --dataset=TASK [--data_dir=D]
TASK: synthetic; folder:PATH (images + labels.json, as `python -m tinyclip_jax.data.synthetic`
writes); zero-shot on TFDS imagenet2012, imagenet_v2, cifar10, cifar100; retrieval on TFDS
coco_captions or webdataset shards wds:PATTERN; NAME:SPLIT picks a split; several
comma-separated. The suite itself is in tinyclip_jax/eval/.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyclip_jax import cli, paths, preprocess, tokenizer
from tinyclip_jax.models import CLIP, CLIPConfig, l2_normalize, variables


@functools.lru_cache(maxsize=16)
def _jitted_encoders(config: CLIPConfig, dtype):
  """Compiled once per model config: periodic evals in training reuse them."""
  model = CLIP(config, dtype=dtype)
  # variables(): BatchNorm (ResNet) evaluates on the running statistics in the weights.
  img = jax.jit(lambda p, x: l2_normalize(model.apply(variables(p), x, method=CLIP.encode_image)))
  txt = jax.jit(lambda p, t: l2_normalize(model.apply(variables(p), t, method=CLIP.encode_text)))
  return img, txt


def encoders(config: CLIPConfig, params, dtype=jnp.float32):
  """(images → normalized embeds, tokens → normalized embeds) for these params."""
  img, txt = _jitted_encoders(config, dtype)
  return (lambda x: img(params, x)), (lambda t: txt(params, t))


def batched(fn: Callable, count: int, load: Callable[[int, int], np.ndarray],
            batch_size: int) -> np.ndarray:
  """fn over load(start, stop) in fixed-size batches; the last one is zero-padded so
  fn compiles once, and the padding rows are dropped from the result."""
  outs = []
  for start in range(0, count, batch_size):
    chunk = load(start, min(start + batch_size, count))
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    outs.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(outs)


def _batched(fn: Callable, x: np.ndarray, batch: int) -> np.ndarray:
  return batched(fn, len(x), lambda a, b: x[a:b], batch)


def zeroshot_classifier(encode_text: Callable, classnames: Sequence[str],
                        prompts: Callable[[str], Sequence[str]], context_length: int,
                        batch: int = 256) -> np.ndarray:
  """(num_classes, embed_dim) unit vectors."""
  texts = [p for c in classnames for p in prompts(c)]
  per_class = len(prompts(classnames[0]))
  emb = _batched(encode_text, tokenizer.tokenize(texts, context_length), batch)
  emb = emb.reshape(len(classnames), per_class, -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def zeroshot_accuracy(encode_image: Callable, classifier: np.ndarray, images: np.ndarray,
                      labels: np.ndarray, batch: int = 256) -> dict[str, float]:
  """images: normalized float NHWC. Returns top1/top5 in [0, 1]."""
  logits = _batched(encode_image, images, batch) @ classifier.T
  k = min(5, classifier.shape[0])
  topk = np.argsort(-logits, axis=-1)[:, :k]
  hits = topk == labels[:, None]
  return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(axis=-1).mean())}


def synthetic_task(num_examples: int, image_size: int, seed: int = 0):
  """(images uint8, labels, class names, prompt fn) of the embedded zero-shot split."""
  from tinyclip_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  spec = synthetic.SyntheticSpec(image_size=image_size, seed=seed)
  images, labels = synthetic.make_zeroshot(spec, num_examples)
  return images, labels, synthetic.zeroshot_classes(spec), synthetic.zeroshot_prompts


def folder_task(path: str, image_size: int):
  """A folder of images + labels.json ({"classes": [prompt], "labels": {file: idx}})."""
  meta_path = os.path.join(path, "labels.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path} does not exist; a dataset folder needs images and a "
                            "labels.json (python -m tinyclip_jax.data.synthetic writes one).")
  with open(meta_path) as f:
    meta = json.load(f)
  files = sorted(meta["labels"])
  images = np.stack([preprocess.load_image(os.path.join(path, n), image_size) for n in files])
  labels = np.array([meta["labels"][n] for n in files], np.int32)
  return images, labels, list(meta["classes"]), lambda c: [c]


def load_task(dataset: str, image_size: int, num_examples: int = 512, seed: int = 0):
  """(normalized images, labels, class names, prompt fn) of a named zero-shot task."""
  if dataset == "synthetic":
    raw, labels, classes, prompts = synthetic_task(num_examples, image_size, seed)
    return preprocess.normalize(raw), labels, classes, prompts
  if dataset.startswith("folder:"):
    return folder_task(dataset[len("folder:"):], image_size)
  raise ValueError(f"dataset {dataset!r} is unknown; use 'synthetic' or 'folder:PATH'.")


def zeroshot(config: CLIPConfig, params, task, batch: int = 256) -> dict[str, float]:
  images, labels, classes, prompts = task
  enc_img, enc_txt = encoders(config, params)
  classifier = zeroshot_classifier(enc_txt, classes, prompts, config.text.context_length, batch)
  return zeroshot_accuracy(enc_img, classifier, images, labels, batch)


def evaluate(config: CLIPConfig, params, dataset: str, num_examples: int = 512,
             batch: int = 256, seed: int = 0) -> dict[str, float]:
  task = load_task(dataset, config.vision.image_size, num_examples, seed)
  return zeroshot(config, params, task, batch)


def main(argv=None) -> int:
  p = cli.Parser(prog="python -m tinyclip_jax.evaluate", description=__doc__,
                 usage_line="python -m tinyclip_jax.evaluate --checkpoint=DIR "
                 "[--dataset=TASK[,TASK...]] [--data_dir=DIR] [--num_examples=N] "
                 "[--max_examples=N] [--output=FILE]")
  p.add_argument("--checkpoint", required=True, type=paths.resolve, help="flax model folder")
  p.add_argument("--dataset", default="synthetic", type=paths.resolve_tasks,
                 help="task(s), comma-separated")
  p.add_argument("--data_dir", default="", type=paths.resolve,
                 help="TFDS data_dir of the datasets")
  p.add_argument("--num_examples", type=int, default=512, help="size of the synthetic task")
  p.add_argument("--max_examples", type=int, default=0, help="per TFDS/wds task; 0 = all")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--output", default="", type=paths.resolve,
                 help="write the metrics as JSON here")
  return cli.run_main(lambda a: _run(p.parse_args(a)), argv)


def _run(args) -> dict:
  from tinyclip_jax import model_io  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.eval import tasks  # pylint: disable=import-outside-toplevel
  names = tasks.task_list(args.dataset)  # unknown names fail before the model loads
  if not names:
    raise cli.UsageError("--dataset is empty; name at least one task.")
  params, config = model_io.load_model(args.checkpoint)
  from tinyclip_jax import parallel  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})  # batches over all devices
  params = jax.device_put(params, parallel.replicated(mesh))
  results = {t: tasks.run(t, config, params, data_dir=args.data_dir, batch=args.batch_size,
                          max_examples=args.max_examples, num_examples=args.num_examples,
                          mesh=mesh)
             for t in names}
  metrics = results[names[0]] if len(names) == 1 else results
  print(json.dumps(metrics))
  if args.output:
    from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
    storage.write_json(args.output, metrics)  # atomic, local or gs://
  return metrics


if __name__ == "__main__":
  sys.exit(main())
