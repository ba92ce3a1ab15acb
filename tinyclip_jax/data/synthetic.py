"""Procedural image-caption dataset: coloured shapes on varied backgrounds, no downloads.

Every example is a pure function of (spec, split, index), so any position in a stream
can be regenerated. Splits: 'train' and 'eval' (same distribution, disjoint streams) with
1..max_objects objects and full captions; 'zeroshot' with one object per image and a
(colour, shape) label out of len(zeroshot_classes(spec)) classes.

CLI: python -m tinyclip_jax.data.synthetic --split=eval --num=N --out=DIR
  ('eval' exports the labelled zero-shot set with labels.json; 'train' exports captions.json.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from tinyclip_jax.data import render

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "crescent")
COLOURS = {  # name -> RGB; backgrounds are achromatic so colour words are unambiguous
    "red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 85, 225), "yellow": (235, 220, 50),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "cyan": (40, 200, 215),
    "pink": (240, 120, 180),
}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)
BACKGROUNDS = ("black", "white", "grey", "striped", "noisy", "gradient", "checkered")
SIZES = ("small", "large")
SPLITS = {"train": 0, "eval": 1, "zeroshot": 2}

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_SIZE_RANGE = {"small": (0.10, 0.13), "large": (0.16, 0.20)}  # radius / image_size
_GRID = (0.22, 0.5, 0.78)  # cell centres / image_size
_JITTER = 0.04
_POS_NAMES = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "centre",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right"
}
_CELLS = tuple(_POS_NAMES)


def _cheb(a, b):
  return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def _layouts(k, start=0, chosen=()):
  """All k-subsets of grid cells with pairwise Chebyshev distance >= 2 (objects never touch)."""
  if k == 0:
    return [chosen]
  out = []
  for i in range(start, len(_CELLS)):
    if all(_cheb(_CELLS[i], c) >= 2 for c in chosen):
      out += _layouts(k - 1, i + 1, chosen + (_CELLS[i],))
  return out


_LAYOUTS = {k: _layouts(k) for k in range(1, 5)}  # 9, 16, 8 and 1 layouts


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  image_size: int = 64
  seed: int = 0
  max_objects: int = 2  # 1..4 for 'train'/'eval'; 'zeroshot' always has 1
  single_object_prob: float = 0.5
  colour_jitter: float = 20.0  # +- per RGB channel
  # Object radii are _SIZE_RANGE × image_size × object_scale. Above 1, shapes near the
  # edge cells are clipped by the image border, so it suits one object per image (the
  # demo: max_objects=1, where a shape must span enough pixels to be told apart).
  object_scale: float = 1.0
  # "full": captions name each object's size, colour, shape and position, and the
  # background; "objects": only size, colour and shape (the demo: a batch's captions
  # then differ only in what the zero-shot classes ask, so a model must learn shape
  # instead of telling pairs apart by position and background).
  captions: str = "full"
  # The backgrounds drawn from (a subset of BACKGROUNDS); the textured ones (striped,
  # checkered, noisy) have edges at the scale of small objects.
  backgrounds: tuple[str, ...] = BACKGROUNDS
  # True: a single object is always drawn in the centre cell (with the usual jitter).
  centred: bool = False

  def __post_init__(self):
    if not 16 <= self.image_size <= 1024:
      raise ValueError(f"image_size must be in [16, 1024], got {self.image_size}")
    if not 1 <= self.max_objects <= 4:
      raise ValueError(f"max_objects must be in [1, 4], got {self.max_objects}")
    if not 0.0 <= self.single_object_prob <= 1.0:
      raise ValueError(f"single_object_prob must be in [0, 1], got {self.single_object_prob}")
    if not self.backgrounds or set(self.backgrounds) - set(BACKGROUNDS):
      raise ValueError(f"backgrounds {self.backgrounds!r} must be a non-empty subset of "
                       f"{BACKGROUNDS}")
    if self.captions not in ("full", "objects"):
      raise ValueError(f"captions must be 'full' or 'objects', got {self.captions!r}")
    if not 0.5 <= self.object_scale <= 2.0:
      raise ValueError(f"object_scale must be in [0.5, 2], got {self.object_scale}")


def appearance(data_cfg) -> dict:
  """The fields of a data config (data.*) that change how the images look, so that the
  zero-shot split is drawn as the training data is (eval/zeroshot.synthetic_task)."""
  return {"object_scale": float(data_cfg.get("object_scale", 1.0)),
          "backgrounds": tuple(data_cfg.get("backgrounds", BACKGROUNDS)),
          "centred": bool(data_cfg.get("centred", False))}


def from_data_config(data_cfg, image_size: int) -> SyntheticSpec:
  """The training stream's generator as a data config (data.*) names it."""
  return SyntheticSpec(image_size=image_size, seed=int(data_cfg.get("seed", 0)),
                       max_objects=int(data_cfg.get("max_objects", 2)),
                       captions=data_cfg.get("captions", "full"), **appearance(data_cfg))


def zeroshot_classes(spec: SyntheticSpec | None = None) -> list[str]:
  """Class names 'colour shape'; label = colour_index * len(SHAPES) + shape_index."""
  return [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]


def zeroshot_factors(spec: SyntheticSpec | None = None) -> dict[str, np.ndarray]:
  """Each class's colour and shape index (label = colour * len(SHAPES) + shape)."""
  labels = np.arange(len(COLOUR_NAMES) * len(SHAPES))
  return {"colour": labels // len(SHAPES), "shape": labels % len(SHAPES)}


_PROMPTS = ("a photo of {}.", "a picture of {}.", "an image of {}.", "a drawing of {}.",
            "a rendering of {}.", "{}.", "a small {}.", "a large {}.")


def _a(phrase):
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def zeroshot_prompts(class_name: str) -> list[str]:
  """Prompt templates for one class; the first is the canonical 'a photo of a {class}.'."""
  return [
      t.format(class_name) if t.startswith(("a small", "a large")) else t.format(_a(class_name))
      for t in _PROMPTS
  ]


# ---- sampling --------------------------------------------------------------------------------


def _pick(u, seq):
  return seq[min(int(u * len(seq)), len(seq) - 1)]


def _sample(spec, split, index):
  """Attributes and render parameters of one example, from its own counter-seeded stream."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  rng = np.random.default_rng([spec.seed, SPLITS[split], index])
  u = rng.random(72)  # fixed draw count: u[0:8] global, u[8:16] background, 14 per object
  S = spec.image_size
  if split == "zeroshot" or spec.max_objects == 1 or u[0] < spec.single_object_prob:
    n = 1
  else:
    n = 2 + min(int(u[1] * (spec.max_objects - 1)), spec.max_objects - 2)
  cells = ((1, 1),) if n == 1 and spec.centred else _pick(u[2], _LAYOUTS[n])
  bg = _pick(u[8], spec.backgrounds)
  b = u[9:16]
  level = {"black": 10 + 30 * b[0], "white": 215 + 35 * b[0]}.get(bg, 90 + 80 * b[0])
  bgp = {
      "kind": bg,
      "level": level,
      "contrast": 40 + 50 * b[1],
      "period": S * (0.12 + 0.15 * b[2]),
      "angle": np.pi * b[3],
      "phase": b[4]
  }
  if bg == "noisy":
    bgp["noise"] = rng.normal(0.0, 28.0, (S, S)).astype(np.float32)
  objs = []
  for k in range(n):
    v = u[16 + 14 * k:30 + 14 * k]
    if split == "zeroshot":
      label = index % (len(COLOUR_NAMES) * len(SHAPES))
      colour, shape = COLOUR_NAMES[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    else:
      colour, shape = _pick(v[0], COLOUR_NAMES), _pick(v[1], SHAPES)
    size = _pick(v[2], SIZES)
    lo, hi = _SIZE_RANGE[size]
    row, col = cells[k]
    rgb = tuple(
        min(255.0, max(0.0, c + spec.colour_jitter * (2 * j - 1)))
        for c, j in zip(COLOURS[colour], v[3:6]))
    objs.append({
        "shape": shape,
        "colour": colour,
        "size": size,
        "position": _POS_NAMES[(row, col)],
        "center": (float(S * (_GRID[col] + _JITTER * (2 * v[6] - 1))),
                   float(S * (_GRID[row] + _JITTER * (2 * v[7] - 1)))),
        "radius": float(S * spec.object_scale * (lo + (hi - lo) * v[8])),
        "angle": float(np.pi / 6 * (v[9] - 0.5)),
        "rgb": rgb,
        "_u": v[10:14]
    })
  attrs = {"objects": objs, "background": bg}
  if split == "zeroshot":
    attrs["label"] = index % (len(COLOUR_NAMES) * len(SHAPES))
  return attrs, bgp, u[3:8]


# ---- captions --------------------------------------------------------------------------------

_POS_PHRASES = {
    "corner": ("in the {} corner", "at the {}", "in the {}"),
    "top": ("at the {}", "near the {}", "along the {}"),
    "bottom": ("at the {}", "near the {}", "along the {}"),
    "left": ("on the {}", "at the {}", "on the {} side"),
    "right": ("on the {}", "at the {}", "on the {} side"),
    "centre": ("in the centre", "in the middle", "at the center")
}
_OBJ_TEMPLATES = ("{size} {colour} {shape} {pos}", "{size} {colour} {shape} located {pos}",
                  "{size} {shape} in {colour} {pos}", "{colour} {size} {shape} {pos}")
_IMG_TEMPLATES = ("{objs}, on a {bg} background.", "a {bg} background with {objs}.",
                  "an image of {objs} on a {bg} background.", "{objs} against a {bg} backdrop.",
                  "a picture of {objs} over a {bg} background.", "a {bg} scene showing {objs}.")


# The zero-shot prompts' own frames (_PROMPTS), so that they are in the captions' distribution.
_OBJECT_TEMPLATES = ("a photo of {objs}.", "a picture of {objs}.", "an image of {objs}.",
                     "a drawing of {objs}.", "a rendering of {objs}.", "{objs}.")


def _caption(attrs, u, kind="full"):
  phrases = []
  for o in attrs["objects"]:
    w = o["_u"]
    if kind == "objects":  # the size word half of the time, as in the zero-shot prompts
      size = _pick(w[0], _SIZE_WORDS[o["size"]]) + " " if w[3] < 0.5 else ""
      phrases.append(_a(f"{size}{o['colour']} {o['shape']}"))
      continue
    pos = o["position"]
    key = "corner" if " " in pos else pos
    fields = {
        "size": _pick(w[0], _SIZE_WORDS[o["size"]]),
        "colour": o["colour"],
        "shape": o["shape"],
        "pos": _pick(w[1], _POS_PHRASES[key]).format(pos)
    }
    phrases.append(_a(_pick(w[2], _OBJ_TEMPLATES).format(**fields)))
  if u[0] < 0.5:  # caption order need not be drawing order
    phrases = phrases[::-1]
  objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
  if kind == "objects":
    return _pick(u[1], _OBJECT_TEMPLATES).format(objs=objs)
  return _pick(u[1], _IMG_TEMPLATES).format(objs=objs, bg=attrs["background"])


def _public(attrs):
  objs = [{k: v for k, v in o.items() if k not in ("rgb", "_u", "angle")} for o in attrs["objects"]]
  return {**attrs, "objects": objs}


# ---- public API -------------------------------------------------------------------------------


def make_batch(spec: SyntheticSpec, split: str, start: int, count: int) -> dict:
  """Examples start..start+count-1 as
  {'images': uint8 NHWC, 'captions': [str], 'attributes': [dict]}."""
  if count <= 0:
    raise ValueError(f"count must be > 0, got {count}")
  samples = [_sample(spec, split, i) for i in range(start, start + count)]
  return {
      "images": render.render(samples, spec.image_size),
      "captions": [_caption(a, u, spec.captions) for a, _, u in samples],
      "attributes": [_public(a) for a, _, _ in samples]
  }


def make_example(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, str, dict]:
  b = make_batch(spec, split, index, 1)
  return b["images"][0], b["captions"][0], b["attributes"][0]


def make_zeroshot(spec: SyntheticSpec, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Single-object images and int32 labels into zeroshot_classes(spec); label = index % classes."""
  b = make_batch(spec, "zeroshot", start, count)
  return b["images"], np.array([a["label"] for a in b["attributes"]], np.int32)


# ---- CLI --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _write(args, tmp):
  from PIL import Image  # only the CLI needs pillow
  spec = SyntheticSpec(image_size=args.image_size, seed=args.seed)
  split = "train" if args.split == "train" else "zeroshot"
  meta = {}
  for start in range(0, args.num, 256):
    b = make_batch(spec, split, start, min(256, args.num - start))
    for j, im in enumerate(b["images"]):
      name = f"{start + j:05d}.png"
      Image.fromarray(im).save(os.path.join(tmp, name))
      meta[name] = b["captions"][j] if split == "train" else b["attributes"][j]["label"]
  if split == "train":
    out = ("captions.json", meta)
  else:
    names = zeroshot_classes(spec)
    out = ("labels.json", {
        "classes": [zeroshot_prompts(c)[0] for c in names],
        "class_names": names,
        "labels": meta
    })
  with open(os.path.join(tmp, out[0]), "w") as f:
    json.dump(out[1], f, indent=1)


def main(argv=None) -> int:
  p = _Parser(description="Write synthetic images as PNGs plus captions.json (train) "
              "or labels.json (eval).")
  p.add_argument(
      "--split",
      required=True,
      choices=["train", "eval", "zeroshot"],
      help="train: captioned images; eval (= zeroshot): labelled single-object images")
  p.add_argument("--num", type=int, required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  if args.num <= 0:
    p.error(f"--num must be positive, got {args.num}.")
  if not 16 <= args.image_size <= 1024:
    p.error(f"--image_size must be in [16, 1024], got {args.image_size}.")
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not os.path.isdir(out):
    p.error(f"--out {out} exists and is not a directory.")
  if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
    p.error(f"--out {out} exists and is not empty; pass --overwrite to replace it.")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
  try:
    _write(args, tmp)
    old = None
    if os.path.isdir(out) and os.listdir(out):
      old = tempfile.mkdtemp(prefix=".synthetic-old-", dir=parent)
      os.rename(out, os.path.join(old, "d"))
    os.replace(tmp, out)  # an empty existing directory is replaced atomically
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(f"wrote {args.num} {args.split} images to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
