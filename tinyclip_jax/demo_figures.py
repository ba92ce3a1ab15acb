"""The demo's pictures, drawn from the data in its summary.json (demo.py):

  top1.png      zero-shot top-1 vs step of every student run, each seed thin, the
                seeds' mean bold, the teacher's final top-1 dashed;
  guesses.png   eval images with the teacher's, the distilled and the scratch
                students' top-1 guesses (green right, red wrong);
  affinity.png  the teacher's image→text affinity matrix beside the distilled
                student's, for one batch (what affinity mimicking imitates);
  auto.png      (configs/demo_auto.py) the automatic student's guesses beside the
                structure its masks kept.
"""
from __future__ import annotations

import io

import numpy as np

from tinyclip_jax import storage

_COLOURS = {"distilled": "tab:blue", "scratch": "tab:orange", "inherit_clip": "tab:green",
            "scratch_long": "tab:red"}
_LABELS = {"distilled": "distilled (inherit + affinity)", "scratch": "scratch (CLIP loss)",
           "inherit_clip": "inherit + CLIP loss (no affinity)",
           "scratch_long": "scratch, 2x steps"}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  storage.write_bytes(path, buf.getvalue())
  _pyplot().close(fig)
  return path


def curves(path: str, history: dict[str, list[dict]], teacher_top1: float) -> str:
  """history: {"<kind>_s<seed>": [{"step", "top1"}, ...]}."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  kinds: dict[str, list[list[dict]]] = {}
  seeds: dict[str, str] = {}  # of a kind run once: its seed, for the legend
  for run, hist in sorted(history.items()):
    kind, _, seed = run.rpartition("_s")
    kinds.setdefault(kind or run, []).append(hist)
    seeds[kind or run] = seed
  for kind, runs in kinds.items():
    colour = _COLOURS.get(kind, "tab:gray")
    style = "--" if kind == "scratch_long" else "-"
    for hist in runs:
      ax.plot([h["step"] for h in hist], [100 * h["top1"] for h in hist], style, color=colour,
              alpha=0.35 if len(runs) > 1 else 0.9, linewidth=1)
    if len(runs) > 1:  # the seeds' mean, at the steps every seed evaluated
      steps = sorted(set.intersection(*({h["step"] for h in r} for r in runs)))
      mean = [100 * np.mean([next(h["top1"] for h in r if h["step"] == s) for r in runs])
              for s in steps]
      ax.plot(steps, mean, style, color=colour, linewidth=2.5,
              label=f"{_LABELS.get(kind, kind)}, mean of {len(runs)} seeds")
    else:
      one = f", seed {seeds[kind]}" if seeds[kind].isdigit() else ""
      ax.plot([], [], style, color=colour, label=_LABELS.get(kind, kind) + one)
  ax.axhline(100 * teacher_top1, color="gray", linestyle=":", label="teacher")
  ax.set_xlabel("training step")
  ax.set_ylabel("zero-shot top-1 (%)")
  ax.set_title("Students' zero-shot accuracy on the generated eval split")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def guesses(path: str, images: np.ndarray, probe: dict, models: tuple[str, ...],
            extra=None) -> str:
  """A grid of images; under each, one line per model: its top-1 class name, green
  when right. `extra(fig, gridspec_slot)` draws beside the grid (auto.png)."""
  plt = _pyplot()
  n, cols = len(images), 4
  rows = -(-n // cols)
  width = 2.3 * cols + (6 if extra else 0)
  fig = plt.figure(figsize=(width, 3.3 * rows))
  # Room under each image for one line per model (text outside the axes, which
  # tight_layout does not see).
  gs = fig.add_gridspec(rows, cols + (3 if extra else 0), hspace=0.25 + 0.17 * len(models),
                        left=0.03, right=0.97, top=0.93, bottom=0.03 + 0.02 * len(models))
  classes, labels = probe["classes"], probe["labels"]
  for i in range(n):
    ax = fig.add_subplot(gs[i // cols, i % cols])
    ax.imshow(images[i], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(classes[labels[i]], fontsize=8)
    lines = [(m, classes[probe["guesses"][m][i]], probe["guesses"][m][i] == labels[i])
             for m in models]
    for k, (m, name, right) in enumerate(lines):
      ax.text(0.5, -0.08 - 0.14 * k, f"{m}: {name}", transform=ax.transAxes, ha="center",
              va="top", fontsize=7, color="green" if right else "red")
  if extra:
    extra(fig, gs[:, cols:])
  fig.suptitle("top-1 guesses on eval images (green: right, red: wrong)")
  return _save(fig, path)


def affinity(path: str, probe: dict) -> str:
  """The two image→text affinity matrices of probe["affinity"] side by side."""
  plt = _pyplot()
  a = probe["affinity"]
  from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
  fig.subplots_adjust(wspace=0.5, bottom=0.25)
  names = [c.removeprefix("a photo of ").rstrip(".") for c in a["texts"]]
  for ax, who in zip(axes, ("teacher", "distilled")):
    # A log scale: the off-diagonal mass (which shapes the model finds alike) is
    # what the student learns beyond the right answer.
    m = np.clip(np.asarray(a[who]), 1e-4, 1)
    im = ax.imshow(m, norm=LogNorm(vmin=1e-4, vmax=1), cmap="viridis")
    ax.set_title(f"{who}: softmax(τ·image·text), τ={a['scale'][who]:g}", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), [f"image of {n.split(' ', 1)[1]}" for n in names],
                  fontsize=7)
    ax.set_xlabel("caption")
  fig.colorbar(im, ax=list(axes), shrink=0.8)
  fig.suptitle("Affinity mimicking: the student learns the teacher's image→text distributions\n"
               "(one batch of one colour's shapes; log scale)")
  return _save(fig, path)


def structure_panel(structure: dict, full: dict):
  """An `extra` for guesses(): kept heads and MLP units per layer of each tower."""

  def draw(fig, slot):
    sub = slot.subgridspec(2, 1)
    for row, tower in enumerate(("visual", "text")):
      ax = fig.add_subplot(sub[row, 0])
      kept, before = structure[tower], full[tower]
      x = np.arange(len(before["mlp"]))
      ax.bar(x, before["mlp"], color="0.85", label="teacher")
      ax.bar(x, kept["mlp"], color="tab:blue", label="kept")
      ax.set_title(f"{tower}: MLP units per layer (width {kept['width']}/{before['width']}, "
                   f"heads {list(kept['heads'])})", fontsize=8)
      ax.set_xticks(x)  # whole layers (matplotlib would also tick 0.5, 1.5, …)
      ax.set_xlabel("layer", fontsize=8)
      if row == 0:
        ax.legend(fontsize=7)

  return draw
