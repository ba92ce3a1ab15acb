"""Evaluation tasks by name: zero-shot classification on TFDS datasets (imagenet2012,
imagenet_v2, cifar10, cifar100) and image–text retrieval on TFDS coco_captions or
webdataset shards (`wds:PATTERN`), plus the embedded `synthetic` (the generated
labelled split) and `folder:PATH` (images + labels.json) zero-shot tasks.

`run` gives one task's metrics for a model; `write_result` keeps a step's metrics
in WORKDIR/evals.
"""
from __future__ import annotations

import json
import os

import jax

from tinyclip_jax import storage, workdir as workdir_lib
from tinyclip_jax.eval import encode, metadata, retrieval, zeroshot


def parse(spec: str) -> tuple[str, str, str]:
  """'cifar10' → ("zeroshot", "cifar10", "test"); 'coco_captions:val' →
  ("retrieval", "coco_captions", "val"); 'wds:PATTERN' → ("wds", PATTERN, "");
  'synthetic' / 'folder:PATH' → ("embedded", spec, "")."""
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


def task_list(tasks: str) -> list[str]:
  """'cifar10, coco_captions' → ['cifar10', 'coco_captions'], each checked."""
  out = [t.strip() for t in tasks.split(",") if t.strip()]
  for t in out:
    parse(t)
  return out


def run(spec: str,
        model_config,
        params,
        *,
        data_dir: str = "",
        batch: int = 256,
        max_examples: int = 0,
        num_examples: int = 512,
        seed: int = 0,
        mesh=None,
        loaded: zeroshot.Task | None = None) -> dict:
  """Metrics of one task for these params. `loaded`: an embedded task's data, loaded
  once by the caller (zeroshot.load_task) and reused across evaluations."""
  kind, name, split = parse(spec)
  size, ctx = model_config.vision.image_size, model_config.text.context_length
  batch = encode.mesh_batch(batch, mesh)  # a batch of whole rows per data-parallel device
  img, txt = encode.encoders(model_config, params)
  encoders = (encode.on_mesh(img, mesh), encode.on_mesh(txt, mesh))
  if kind == "embedded":
    task = loaded if loaded is not None else zeroshot.load_task(name, size, num_examples, seed)
    return zeroshot.evaluate_task(task, encoders, ctx, batch)
  kw = dict(data_dir=data_dir, batch=batch, max_examples=max_examples)
  if kind == "zeroshot":
    return zeroshot.evaluate_tfds(name, split, encoders, size, ctx, **kw)
  if kind == "retrieval":
    return retrieval.evaluate_tfds(name, split, encoders, size, ctx, **kw)
  return retrieval.evaluate(retrieval.wds_pairs(name, max_examples), encoders, size, ctx, batch)


def write_result(workdir: str, step: int, metrics: dict) -> str | None:
  """WORKDIR/evals/step_NNNNNNNN.json (process 0; written whole, then renamed)."""
  if jax.process_index() != 0:
    return None
  text = json.dumps({"step": step, **metrics}, indent=2)
  path = workdir_lib.eval_result(workdir, step)
  storage.write_text(path, text)  # one object / temp + rename: never half-written
  return path
