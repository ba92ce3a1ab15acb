"""CLIP eval preprocessing (checked by hand and against transformers) and the
`python -m tinyclip_jax.embed` CLI, in-process through main(argv)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from torch_reference import CLIP as TorchCLIP
from tinyclip_jax import model_io
from tinyclip_jax.convert import from_openai
from tinyclip_jax.embed import main
from tinyclip_jax.eval import encode
from tinyclip_jax.models import CLIPConfig, text_tower, vision_tower
from tinyclip_jax.preprocess import (CLIP_MEAN, CLIP_STD, center_crop_box, load_image, normalize,
                                     resized_size)
from tinyclip_jax.tokenizer import tokenize

CFG = CLIPConfig(32, vision_tower(64, 2, 8, image_size=32, mlp=96), text_tower(64, 1, mlp=80))


def random_image(width, height, seed=0, mode="RGB"):
  pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
  return Image.fromarray(pixels).convert(mode)


def by_hand(pixels: np.ndarray) -> np.ndarray:
  return ((pixels.astype(np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD))


# ----------------------------------------------------------------------------- preprocess


def test_resize_and_crop_geometry_follows_torchvision():
  # Shorter side → size; longer side int(size * long / short), truncated.
  assert resized_size(9, 5, 4) == (7, 4)  # 7.2 → 7
  assert resized_size(5, 9, 4) == (4, 7)
  assert resized_size(50, 37, 32) == (43, 32)  # 43.24 → 43
  assert resized_size(32, 32, 32) == (32, 32)
  # Offsets int(round(diff / 2)), round-half-to-even as Python's round.
  assert center_crop_box(7, 4, 4) == (2, 0, 6, 4)  # 1.5 → 2
  assert center_crop_box(5, 4, 4) == (0, 0, 4, 4)  # 0.5 → 0
  assert center_crop_box(43, 32, 32) == (6, 0, 38, 32)  # 5.5 → 6
  assert center_crop_box(32, 37, 32) == (0, 2, 32, 34)  # 2.5 → 2


def test_load_image_on_a_small_non_square_image():
  image = random_image(9, 5)
  # By hand: 9x5 → 7x4 bicubic, then columns 2..5 (offset round(1.5) = 2).
  resized = np.asarray(image.resize((7, 4), Image.BICUBIC))
  want = by_hand(resized[:, 2:6])
  got = load_image(image, 4)
  assert got.shape == (4, 4, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  # An image already at the target size is only normalized.
  square = random_image(4, 4, seed=1)
  np.testing.assert_allclose(load_image(square, 4), by_hand(np.asarray(square)), atol=1e-6)


def test_load_image_converts_modes_to_rgb(tmp_path):
  for mode in ("L", "RGBA", "P"):
    path = tmp_path / f"{mode}.png"
    random_image(6, 8, mode=mode).save(path)
    got = load_image(str(path), 4)
    assert got.shape == (4, 4, 3)
    want = np.asarray(Image.open(path).convert("RGB").resize((4, 5), Image.BICUBIC))[0:4]
    np.testing.assert_allclose(got, by_hand(want), atol=1e-6)  # offset round(0.5) = 0


def test_normalize_by_hand():
  pixels = np.zeros((1, 1, 2, 3), np.uint8)
  pixels[0, 0, 1] = 255
  got = normalize(pixels)
  np.testing.assert_allclose(got[0, 0, 0], -np.float32(CLIP_MEAN) / np.float32(CLIP_STD),
                             rtol=1e-6)
  np.testing.assert_allclose(got[0, 0, 1, 0], (1 - 0.48145466) / 0.26862954, rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    normalize(pixels.astype(np.float32))


def test_matches_transformers_clip_image_processor():
  from transformers import CLIPImageProcessor
  processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
  # 45x37 → 38x32, crop offset 3: HF floors (diff // 2) where torchvision rounds, so
  # compare on an even difference, where both conventions agree.
  image = random_image(45, 37, seed=2)
  want = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(load_image(image, 32), want, atol=1e-5)


# ----------------------------------------------------------------------------- embed CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchCLIP.from_config(CFG)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  params, cfg = from_openai({k: v.numpy() for k, v in model.state_dict().items()}, "gelu")
  path = tmp_path_factory.mktemp("embed") / "ckpt"
  model_io.save_model(path, params, cfg)
  return path, params


@pytest.fixture(scope="module")
def reference(checkpoint):
  return encode.encoders(CFG, checkpoint[1])


def test_embed_image_folder_and_captions(checkpoint, reference, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  sizes = {"b.png": (45, 37), "a.png": (32, 32), "c.JPG": (20, 50)}
  for i, (name, (w, h)) in enumerate(sizes.items()):
    random_image(w, h, seed=i).save(folder / name)
  (folder / "notes.txt").write_text("not an image")
  (folder / "sub.png").mkdir()  # a folder with an image-like name is skipped
  captions = ["a photo of a cat", "", "a diagram of a transformer"]
  (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
  out = tmp_path / "out.npz"
  assert main([f"--checkpoint={checkpoint[0]}", f"--images={folder}",
               f"--texts={tmp_path / 'captions.txt'}", f"--output={out}", "--batch_size=2"]) == 0

  got = np.load(out)
  names = sorted(sizes)
  assert list(got["image_files"]) == names
  preprocessed = np.stack([load_image(folder / n, 32) for n in names])
  image_fn, text_fn = reference
  np.testing.assert_allclose(got["image_embeds"], image_fn(preprocessed), atol=1e-6)
  tokens = tokenize(captions, 77)
  assert got["tokens"].dtype == np.int32 and np.array_equal(got["tokens"], tokens)
  np.testing.assert_allclose(got["text_embeds"], text_fn(tokens), atol=1e-6)
  for key in ("image_embeds", "text_embeds"):
    assert got[key].dtype == np.float32 and got[key].shape[1] == CFG.embed_dim
    np.testing.assert_allclose(np.linalg.norm(got[key], axis=-1), 1.0, atol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["captions.txt", "images", "out.npz"]


def test_embed_npy_images(checkpoint, reference, tmp_path):
  pixels = np.random.RandomState(3).randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  np.save(tmp_path / "batch.npy", pixels)
  out = tmp_path / "out.npz"
  assert main([f"--checkpoint={checkpoint[0]}", f"--images={tmp_path / 'batch.npy'}",
               f"--output={out}", "--batch_size=2"]) == 0
  got = np.load(out)
  assert set(got.files) == {"image_embeds", "image_files"}
  np.testing.assert_allclose(got["image_embeds"], reference[0](normalize(pixels)), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got["image_embeds"], axis=-1), 1.0, atol=1e-6)


def _bad(tmp_path, ckpt):
  (tmp_path / "empty").mkdir()
  np.save(tmp_path / "small.npy", np.zeros((2, 16, 16, 3), np.uint8))
  np.save(tmp_path / "float.npy", np.zeros((2, 32, 32, 3), np.float32))
  (tmp_path / "none.txt").write_text("")
  c, texts = f"--checkpoint={ckpt}", f"--texts={tmp_path / 'none.txt'}"
  return {
      "nothing to embed": ([c], "nothing to embed"),
      "missing checkpoint": ([f"--checkpoint={tmp_path / 'nope'}", texts], "does not exist"),
      "not a checkpoint": ([f"--checkpoint={tmp_path / 'empty'}", texts],
                           "not a model checkpoint"),
      "empty folder": ([c, f"--images={tmp_path / 'empty'}"], "has no image files"),
      "wrong size": ([c, f"--images={tmp_path / 'small.npy'}"], "(N >= 1, 32, 32, 3)"),
      "wrong dtype": ([c, f"--images={tmp_path / 'float.npy'}"], "uint8"),
      "missing images": ([c, f"--images={tmp_path / 'absent'}"], "does not exist"),
      "empty captions": ([c, texts], "is empty"),
      "missing captions": ([c, f"--texts={tmp_path / 'absent.txt'}"], "is not a file"),
      "bad batch size": ([c, texts, "--batch_size=0"], "at least 1"),
  }


@pytest.mark.parametrize("case", ["nothing to embed", "missing checkpoint", "not a checkpoint",
                                  "empty folder", "wrong size", "wrong dtype", "missing images",
                                  "empty captions", "missing captions", "bad batch size"])
def test_bad_input_exits_2(checkpoint, tmp_path, capsys, case):
  argv, words = _bad(tmp_path, checkpoint[0])[case]
  out = tmp_path / "out.npz"
  assert main(argv + [f"--output={out}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
  assert not out.exists()
