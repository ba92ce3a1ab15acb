"""Tiny local TFDS datasets under the real names (cifar10, coco_captions), built from
generated images by subclasses of the real builders that only replace where the
examples come from: `tfds.builder(name, data_dir=...)` then reads them as it would
read the real ones. Nothing is downloaded."""
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar
from tensorflow_datasets.object_detection import coco_captions

from tinyclip_jax.data import synthetic


def images(n: int, seed: int, sizes=((32, 32),)):
  spec = synthetic.SyntheticSpec(image_size=64, seed=seed)
  out = []
  for i in range(n):
    img = synthetic.make_example(spec, "eval", i)[0]
    h, w = sizes[i % len(sizes)]
    out.append(np.ascontiguousarray(img[:h, :w]))
  return out


def local_builder(base, examples: list[dict]):
  """`base` (a TFDS builder class, under its own dataset name) whose train and test
  splits are `examples`: prepared locally, nothing downloaded."""

  class Local(base, skip_registration=True):
    name = base.name

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._examples(), "test": self._examples()}

    def _examples(self):
      for i, ex in enumerate(examples):
        yield i, ex

  return Local


def build_cifar10(data_dir: str, n: int = 24) -> list[dict]:
  examples = [{
      "id": f"test_{i:05d}",
      "image": im,
      "label": i % 10
  } for i, im in enumerate(images(n, 1))]

  local_builder(cifar.Cifar10, examples)(data_dir=data_dir).download_and_prepare()
  return examples


def caption_sets(n: int) -> list[list[str]]:
  spec = synthetic.SyntheticSpec(image_size=32, seed=2)
  # 1 to 5 captions per image, as COCO has ~5
  return [[synthetic.make_example(spec, "train", 10 * i + j)[1]
           for j in range(1 + i % 5)]
          for i in range(n)]


def build_coco_captions(data_dir: str, n: int = 20, shards: int = 1,
                        captions: list[list[str]] | None = None) -> list[dict]:
  """`captions`: each image's captions (default `caption_sets(n)`)."""
  pics = images(n, 3, sizes=((40, 48), (48, 36), (32, 32)))
  examples = []
  for i, (im, caps) in enumerate(zip(pics, captions or caption_sets(n))):
    examples.append({
        "image": im,
        "image/filename": f"{i:012d}.jpg",
        "image/id": i,
        "objects": {
            "area": [],
            "bbox": np.zeros((0, 4), np.float32),
            "id": [],
            "is_crowd": [],
            "label": []
        },
        "captions": [{
            "id": 100 * i + j,
            "text": c
        } for j, c in enumerate(caps)]
    })

  config = tfds.download.DownloadConfig(max_examples_per_split=None)
  b = local_builder(coco_captions.CocoCaptions, examples)(data_dir=data_dir)
  if shards > 1:  # several files per split, so training can deal them to windows
    config = tfds.download.DownloadConfig(num_shards=shards)
  b.download_and_prepare(download_config=config)
  return examples
