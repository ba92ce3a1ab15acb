"""Evaluation suite: recall@k against open_clip's torch computation, zero-shot and
retrieval on local TFDS datasets under their real names against a torch spelling of
CLIP's recipe, the same numbers sharded over 8 devices, the training suite, the CLI,
bad task names and the retired eval.kind."""
import json

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image

import tfds_fixtures
from tinyclip_jax import evaluate, model_io, parallel, preprocess, tokenizer
from tinyclip_jax.data import make_shards, shards, synthetic
from tinyclip_jax.eval import encode, metadata, retrieval, tasks
from tinyclip_jax.eval import suite as eval_suite
from tinyclip_jax.models import CLIPConfig, init_params, text_tower, vision_tower
from tinyclip_jax.train import defaults, prepare

CFG = CLIPConfig(16, vision_tower(32, 1, 8, image_size=32, head_dim=16),
                 text_tower(32, 1, head_dim=16, context_length=32))
# CLIP's CIFAR-10 prompts (openai/CLIP data/prompts.md), written out independently of
# the package's asset.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]
CIFAR_TEMPLATES = [f"a {q}photo of {a} {{}}." for a in ("a", "the") for q in (
    "", "blurry ", "black and white ", "low contrast ", "high contrast ", "bad ", "good ")] + \
    [f"a photo of {a} {s} {{}}." for a in ("a", "the") for s in ("small", "big")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds_fixtures.build_cifar10(d)
  tfds_fixtures.build_coco_captions(d)
  return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  params = init_params(CFG, jax.random.key(0))
  path = tmp_path_factory.mktemp("model") / "m"
  model_io.save_model(str(path), params, CFG)
  return params, path


def open_clip_recall(scores, positive, k):
  """open_clip's retrieval recall@k (training/zero_shot... `recall_at_k` + `batchify`)."""
  topk = torch.topk(scores, k, dim=1)[1]
  onehot = torch.nn.functional.one_hot(topk, num_classes=scores.shape[1])
  true_pos = (onehot * positive.view(positive.shape[0], 1, -1)).sum(dim=(1, 2))
  return float(((true_pos / positive.sum(dim=1)) > 0).double().mean())


def reference_recall(img, txt, text_image):
  img, txt = torch.tensor(img), torch.tensor(txt)
  positive = torch.zeros(len(img), len(txt))
  positive[torch.tensor(text_image), torch.arange(len(txt))] = 1
  out = {}
  for k in retrieval.KS:
    out[f"image_to_text/R@{k}"] = open_clip_recall(img @ txt.T, positive, k)
    out[f"text_to_image/R@{k}"] = open_clip_recall(txt @ img.T, positive.T, k)
  return out


def test_recall_at_k_matches_open_clip():
  rng = np.random.default_rng(0)
  n_img = 37
  text_image = np.repeat(np.arange(n_img), rng.integers(1, 6, n_img))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  img = unit(rng.standard_normal((n_img, 8))).astype(np.float32)
  txt = unit(img[text_image] + 0.9 * rng.standard_normal((len(text_image), 8))).astype(np.float32)
  ours = retrieval.recall_at_k(img, txt, text_image, chunk=5)
  assert ours == reference_recall(img, txt, text_image)
  assert 0 < ours["image_to_text/R@1"] < ours["image_to_text/R@10"] < 1


def test_metadata_is_clips():
  assert len(metadata.classes("imagenet")) == 1000
  assert len(metadata.templates("imagenet")) == 80
  c = metadata.classes("imagenet")
  assert (c[0], c[1], c[21], c[999]) == ("tench", "goldfish", "kite (bird of prey)", "toilet paper")
  assert metadata.templates("imagenet")[0] == "a bad photo of a {}."
  assert metadata.templates("imagenet")[-1] == "a tattoo of the {}."
  assert metadata.classes("cifar10") == CIFAR10_CLASSES
  assert sorted(metadata.templates("cifar10")) == sorted(CIFAR_TEMPLATES)
  assert metadata.templates("cifar100") == metadata.templates("cifar10")
  assert len(metadata.classes("cifar100")) == 100 and metadata.classes("cifar100")[-1] == "worm"


def clip_preprocessed(data_dir, name, n=None):
  ds = tfds.builder(name, data_dir=data_dir).as_dataset(split="test", shuffle_files=False)
  return [(preprocess.load_image(Image.fromarray(ex["image"]), 32), ex)
          for ex in ds.as_numpy_iterator()][:n]


def torch_zeroshot(params, images, labels, classes, prompts) -> dict[str, float]:
  """CLIP's zero-shot recipe in torch (its zeroshot_classifier: per class the normalized
  prompt embeddings averaged and renormalized), top-1/top-5 by torch.topk."""
  enc_img, enc_txt = encode.encoders(CFG, params)
  image_emb = torch.tensor(np.asarray(enc_img(images)))
  weights = []
  for c in classes:
    e = torch.tensor(np.asarray(enc_txt(tokenizer.tokenize(prompts(c), 32))))
    e = e / e.norm(dim=-1, keepdim=True)
    e = e.mean(dim=0)
    weights.append(e / e.norm())
  logits = image_emb @ torch.stack(weights, dim=1)
  top5 = logits.topk(5, dim=1).indices
  labels = torch.tensor(np.asarray(labels, np.int64))
  return {"top1": float((top5[:, 0] == labels).double().mean()),
          "top5": float((top5 == labels[:, None]).any(1).double().mean()),
          "guess": top5[:, 0].numpy()}


def torch_cifar10(data_dir, params) -> dict[str, float]:
  rows = clip_preprocessed(data_dir, "cifar10")
  return torch_zeroshot(params, np.stack([x for x, _ in rows]),
                        [int(ex["label"]) for _, ex in rows], CIFAR10_CLASSES,
                        lambda c: [t.format(c) for t in metadata.templates("cifar10")])


def test_zeroshot_cifar10_matches_torch(data_dir, model):
  params, _ = model  # batches of 12 over the 8 devices: rounded up to 16 rows
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  ours = tasks.run("cifar10", CFG, params, data_dir=data_dir, batch=12, mesh=mesh)
  ref = torch_cifar10(data_dir, params)
  assert ours["num_examples"] == len(clip_preprocessed(data_dir, "cifar10")) == 24
  assert ours["top1"] == pytest.approx(ref["top1"], abs=1e-9)
  assert ours["top5"] == pytest.approx(ref["top5"], abs=1e-9)


def test_training_suite_names_writes_and_matches_torch(data_dir, model, tmp_path):
  """The train loop's entry: `synthetic` is a task like cifar10 (its metrics keep their
  unprefixed names), all sharded over the 8 devices, the step's file written whole."""
  params, _ = model
  config = ml_collections.ConfigDict({"tasks": "synthetic, cifar10", "num_examples": 20,
                                      "batch_size": 12, "data_dir": data_dir, "max_examples": 0})
  suite = eval_suite.Suite(config, 32, str(tmp_path))
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  ours = suite.run(CFG, params, mesh, step=7)
  assert set(ours) == {"top1", "top5", "colour_top1", "shape_top1", "cifar10/top1",
                       "cifar10/top5", "cifar10/num_examples"}
  # the generated split, normalized by hand with CLIP's mean and std
  spec = synthetic.SyntheticSpec(image_size=32, seed=0)
  raw, labels = synthetic.make_zeroshot(spec, 20)
  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  images = (raw.astype(np.float32) / np.float32(255) - mean) / std
  ref = torch_zeroshot(params, images, labels, synthetic.zeroshot_classes(spec),
                       synthetic.zeroshot_prompts)
  cifar = torch_cifar10(data_dir, params)
  for k in ("top1", "top5"):
    assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    assert ours[f"cifar10/{k}"] == pytest.approx(cifar[k], abs=1e-9), k
  # The generated classes are colour-major (8 shapes per colour): the top-1 guess's
  # colour and shape against the label's, by hand.
  guess = ref["guess"]
  assert ours["colour_top1"] == pytest.approx(np.mean(guess // 8 == labels // 8), abs=1e-9)
  assert ours["shape_top1"] == pytest.approx(np.mean(guess % 8 == labels % 8), abs=1e-9)
  assert ours["cifar10/num_examples"] == 24
  assert json.loads((tmp_path / "evals" / "step_00000007.json").read_text()) == {"step": 7,
                                                                                 **ours}
  assert [p.name for p in (tmp_path / "evals").iterdir()] == ["step_00000007.json"]
  assert eval_suite.Suite(ml_collections.ConfigDict({"tasks": ""}), 32).tasks == []


def test_retired_eval_kind_is_one_sentence():
  config = defaults.base_config()
  config.eval.kind = "synthetic"  # a config file written before eval.tasks took it in
  with pytest.raises(prepare.SetupError) as e:
    prepare.validate(config)
  assert str(e.value) == eval_suite.KIND_RETIRED
  assert "eval.tasks='synthetic'" in str(e.value) and str(e.value).count(". ") == 0


@pytest.mark.parametrize("sharded", [False, True])
def test_coco_retrieval_matches_torch(data_dir, model, sharded):
  params, _ = model
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}) if sharded else None
  ours = tasks.run("coco_captions", CFG, params, data_dir=data_dir, batch=8, mesh=mesh)
  enc_img, enc_txt = encode.encoders(CFG, params)
  rows = clip_preprocessed(data_dir, "coco_captions")
  texts, text_image = [], []
  for i, (_, ex) in enumerate(rows):
    caps = [t.decode() for t in ex["captions"]["text"]]
    texts += caps
    text_image += [i] * len(caps)
  img = np.asarray(enc_img(np.stack([x for x, _ in rows])))
  txt = np.asarray(enc_txt(tokenizer.tokenize(texts, 32)))
  ref = reference_recall(img, txt, np.array(text_image))
  assert (ours["num_images"], ours["num_texts"]) == (20, len(texts))
  for k, v in ref.items():
    assert ours[k] == pytest.approx(v, abs=1e-9), k


def test_wds_retrieval_and_cli(data_dir, model, tmp_path, capsys):
  params, path = model
  captions = tfds_fixtures.caption_sets(12)
  items = []
  for i, (key, parts) in enumerate(make_shards.samples(12, 40, 0)):
    parts["txt"] = "\n".join(captions[i]).encode()
    items.append((key, parts))
  make_shards.write_tar(str(tmp_path / "00000.tar"), items[:7])
  make_shards.write_tar(str(tmp_path / "00001.tar"), items[7:])
  ours = tasks.run(f"wds:{tmp_path}/{{00000..00001}}.tar", CFG, params, batch=5)
  enc_img, enc_txt = encode.encoders(CFG, params)
  img = np.stack(
      [preprocess.load_image(Image.open(__import__("io").BytesIO(p["jpg"])), 32) for _, p in items])
  texts = [c for caps in captions for c in caps]
  text_image = [i for i, caps in enumerate(captions) for _ in caps]
  ref = reference_recall(
      np.asarray(enc_img(img)), np.asarray(enc_txt(tokenizer.tokenize(texts, 32))),
      np.array(text_image))
  for k, v in ref.items():
    assert ours[k] == pytest.approx(v, abs=1e-9), k

  out = tmp_path / "eval.json"
  assert evaluate.main([
      f"--checkpoint={path}", "--dataset=cifar10,coco_captions:train", f"--data_dir={data_dir}",
      "--max_examples=10", f"--output={out}"
  ]) == 0
  result = json.loads(out.read_text())
  assert set(result) == {"cifar10", "coco_captions:train"}
  assert result["cifar10"]["num_examples"] == 10 and result["coco_captions:train"][
      "num_images"] == 10
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_bad_tasks_and_datasets(data_dir, model, tmp_path, capsys):
  params, path = model
  with pytest.raises(ValueError, match="eval task 'cifar11' is unknown"):
    tasks.task_list("cifar10, cifar11")
  with pytest.raises(shards.DataError, match=r"'cifar100' is not prepared in .*cifar100"):
    tasks.run("cifar100", CFG, params, data_dir=data_dir)
  assert evaluate.main([
      f"--checkpoint={path}", "--dataset=imagenet2012", f"--data_dir={tmp_path}",
      f"--output={tmp_path / 'o.json'}"
  ]) == 2
  err = capsys.readouterr().err
  assert "imagenet2012" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "o.json").exists()
