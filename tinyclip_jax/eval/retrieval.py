"""Image–text retrieval recall@k, both directions, with several captions per image.

image → text: an image is a hit at k when any of its captions is among the k texts
most similar to it; text → image: a text is a hit when its image is among the k
images most similar to it (as open_clip and CLIP_benchmark count). Computed from
ranks in chunks, so 5k images × 25k captions never build a full argsort.

Tasks: TFDS coco_captions and webdataset shards (`wds:PATTERN`, captions one per
line of KEY.txt), streamed: only the embeddings are kept.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from tinyclip_jax.eval import encode, metadata

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


def evaluate(pairs: Iterable[tuple[bytes, list[str]]], encoders, size: int,
             context_length: int, batch: int) -> dict:
  """recall@k of (encoded image, its captions) pairs, plus the counts."""
  enc_img, enc_txt = encoders
  embs, texts, text_image, n = [], [], [], 0
  for chunk in encode.chunks(pairs, batch):
    embs.append(encode.embed_encoded(enc_img, [image for image, _ in chunk], size, batch))
    for _, captions in chunk:
      texts.extend(captions)
      text_image.extend([n] * len(captions))
      n += 1
  if not n:
    raise ValueError("the retrieval set is empty.")
  text_emb = encode.embed_texts(enc_txt, texts, context_length, batch)
  return {**recall_at_k(np.concatenate(embs), text_emb, np.asarray(text_image)),
          "num_images": n, "num_texts": len(texts)}


def evaluate_tfds(name: str,
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
  pairs = ((ex["image"], [c.decode("utf-8", "replace") for c in ex["captions"]])
           for ex in examples
           if len(ex["captions"]))
  return evaluate(pairs, encoders, size, context_length, batch)


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
