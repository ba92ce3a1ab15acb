"""Image–text retrieval recall@k, both directions, with several captions per image.

image → text: an image is a hit at k when any of its captions is among the k texts
most similar to it; text → image: a text is a hit when its image is among the k
images most similar to it (as open_clip and CLIP_benchmark count). Computed from
ranks in chunks, so 5k images × 25k captions never build a full argsort.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def recall_at_k(image_emb: np.ndarray,
                text_emb: np.ndarray,
                text_image: np.ndarray,
                ks=KS,
                chunk: int = 1024) -> dict[str, float]:
  """image_emb (N, D), text_emb (M, D) normalized; text_image (M,) the image index
  of each text. Returns {"image_to_text/R@k", "text_to_image/R@k"} in [0, 1]."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_image = np.asarray(text_image)
  n = len(image_emb)
  own = np.zeros((n, len(text_emb)), bool)
  own[text_image, np.arange(len(text_emb))] = True
  if not own.any(axis=1).all():
    raise ValueError("every image needs at least one caption for image→text recall.")
  i2t_rank = np.empty(n, np.int64)
  for a in range(0, n, chunk):
    sim = image_emb[a:a + chunk] @ text_emb.T
    best = np.where(own[a:a + chunk], sim, -np.inf).max(axis=1)
    i2t_rank[a:a + chunk] = (sim > best[:, None]).sum(axis=1)
  t2i_rank = np.empty(len(text_emb), np.int64)
  for a in range(0, len(text_emb), chunk):
    sim = text_emb[a:a + chunk] @ image_emb.T
    mine = sim[np.arange(len(sim)), text_image[a:a + chunk]]
    t2i_rank[a:a + chunk] = (sim > mine[:, None]).sum(axis=1)
  out = {}
  for k in ks:
    out[f"image_to_text/R@{k}"] = float((i2t_rank < k).mean())
    out[f"text_to_image/R@{k}"] = float((t2i_rank < k).mean())
  return out
