"""Class names and prompt templates of CLIP's zero-shot evaluations, stored as data
(assets/zeroshot_metadata.json): OpenAI's 1000 ImageNet class names and 80 templates
(notebooks/imagenet_data.json of openai/CLIP), and CLIP's CIFAR-10/100 class names
and 18 templates (data/prompts.md)."""
from __future__ import annotations

import functools
import json
import os

ASSET = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "zeroshot_metadata.json")

# TFDS name → (default split, metadata entry, label feature)
ZEROSHOT = {
    "imagenet2012": ("validation", "imagenet", "label"),
    "imagenet_v2": ("test", "imagenet", "label"),
    "cifar10": ("test", "cifar10", "label"),
    "cifar100": ("test", "cifar100", "label"),
}
# TFDS name → (default split, caption feature); several captions per image
RETRIEVAL = {"coco_captions": ("test", "captions/text")}


@functools.lru_cache(maxsize=1)
def _load() -> dict:
  with open(ASSET) as f:
    return json.load(f)


def classes(entry: str) -> list[str]:
  return list(_load()[entry]["classes"])


def templates(entry: str) -> list[str]:
  return list(_load()[entry]["templates"])


def prompts(entry: str):
  """class name → its prompts, one per template."""
  ts = templates(entry)
  return lambda c: [t.format(c) for t in ts]
