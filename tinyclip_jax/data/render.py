"""Drawing the generated dataset's images (data/synthetic.py samples them), vectorised
over a batch: anti-aliased shapes from signed distances, over drawn backgrounds."""
from __future__ import annotations

import numpy as np



def sdf(shape, x, y):
  """Approximate signed distance in units of the object radius (negative inside)."""
  if shape == "circle":
    return np.hypot(x, y) - 0.95
  if shape == "square":
    return np.maximum(abs(x), abs(y)) - 0.82
  if shape == "triangle":  # pointing up (image y grows downwards)
    return np.maximum(y - 0.55, np.maximum(0.866 * x - 0.5 * y, -0.866 * x - 0.5 * y) - 0.55)
  if shape == "diamond":
    return (abs(x) + abs(y) - 1.1) * 0.7071
  if shape == "cross":
    ax, ay = abs(x), abs(y)
    return np.minimum(np.maximum(ax - 1.0, ay - 0.33), np.maximum(ax - 0.33, ay - 1.0))
  if shape == "ring":
    return abs(np.hypot(x, y) - 0.74) - 0.24
  if shape == "star":  # five soft points, one pointing up
    return (np.hypot(x, y) - 0.62 - 0.4 * np.cos(5 * np.arctan2(x, -y))) * 0.6
  if shape == "crescent":
    return np.maximum(np.hypot(x, y) - 1.0, 0.85 - np.hypot(x - 0.45, y + 0.3))
  raise ValueError(shape)


def backgrounds(bgps, S):
  xs = np.arange(S, dtype=np.float32) + 0.5
  out = np.empty((len(bgps), S, S), np.float32)
  for kind in set(p["kind"] for p in bgps):
    idx = [i for i, p in enumerate(bgps) if p["kind"] == kind]
    g = lambda key: np.array([bgps[i][key] for i in idx], np.float32)[:, None, None]  # noqa: E731
    level = g("level")
    if kind in ("black", "white", "grey"):
      out[idx] = np.broadcast_to(level, (len(idx), S, S))
      continue
    ang = g("angle")
    t = np.cos(ang) * xs[None, None, :] + np.sin(ang) * xs[None, :, None]  # coordinate along angle
    if kind == "striped":
      val = level + g("contrast") * np.sign(np.sin(2 * np.pi * (t / g("period") + g("phase")))) / 2
    elif kind == "checkered":
      per = g("period")
      cell = np.floor(xs[None, None, :] / per + g("phase")) + np.floor(xs[None, :, None] / per)
      val = level + g("contrast") * (np.mod(cell, 2) - 0.5)
    elif kind == "gradient":
      val = level + 1.6 * g("contrast") * (t / (S * 1.42) - 0.35)
    else:  # noisy
      val = level + np.stack([bgps[i]["noise"] for i in idx])
    out[idx] = val
  return out


def render(samples, S):
  bg = np.clip(backgrounds([b for _, b, _ in samples], S), 0, 255)
  cover = np.zeros((len(samples), S, S), np.float32)  # summed alpha (objects never overlap)
  paint = np.zeros((len(samples), S, S, 3), np.float32)  # summed alpha * colour
  # Each object is drawn in a B x B box; shapes reach < 1.2 radius from their centre.
  B = min(S, int(np.ceil(2.4 * max(o["radius"] for a, _, _ in samples for o in a["objects"]))) + 4)
  ar = np.arange(B)
  for slot in range(max(len(a["objects"]) for a, _, _ in samples)):
    objs = [
        (i, a["objects"][slot]) for i, (a, _, _) in enumerate(samples) if slot < len(a["objects"])
    ]
    for shape in sorted({o["shape"] for _, o in objs}):  # one object per image per slot
      sel = [(i, o) for i, o in objs if o["shape"] == shape]
      if not sel:
        continue
      ii = np.array([i for i, _ in sel])[:, None, None]
      p = np.array([(*o["center"], o["radius"], o["angle"]) for _, o in sel], np.float32)
      ox, oy = (
          np.clip(np.rint(p[:, k] - B / 2), 0, S - B).astype(np.int64)[:, None, None]
          for k in (0, 1))
      cx, cy, r, ang = (p[:, k, None, None] for k in range(4))
      dx, dy = ox + ar[None, None, :] + 0.5 - cx, oy + ar[None, :, None] + 0.5 - cy  # pixel centres
      c, s = np.cos(ang), np.sin(ang)
      dist = sdf(shape, (c * dx + s * dy) / r, (c * dy - s * dx) / r) * r  # in pixels
      alpha = np.minimum(np.maximum(0.5 - dist, 0), 1)
      yy, xx = oy + ar[None, :, None], ox + ar[None, None, :]
      cover[ii, yy, xx] += alpha
      rgb = np.array([o["rgb"] for _, o in sel], np.float32)[:, None, None, :]
      paint[ii, yy, xx] += alpha[..., None] * rgb
  cover = np.minimum(cover, 1.0)
  img = (bg * (1 - cover))[..., None] + paint + 0.5
  return np.minimum(img, 255.0).astype(np.uint8)
