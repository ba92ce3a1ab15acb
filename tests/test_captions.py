"""Captions that hold line-break characters other than the line feed stay whole in
every reader: embed's --texts file, a webdataset KEY.txt of the retrieval
evaluation, and the TFDS training input (several captions per image)."""
import jax
import numpy as np
import pytest

from tinyclip_jax import model_io
from tinyclip_jax.data import make_shards, pipeline
from tinyclip_jax.data.captions import split_lines
from tinyclip_jax.embed import load_texts, main
from tinyclip_jax.eval import retrieval
from tinyclip_jax.models import CLIPConfig, param_shapes, text_tower, vision_tower
from tinyclip_jax.train import defaults

# Every character str.splitlines breaks at besides "\n" ("\r" only before "\n"), and
# the unit separator the TFDS input used to join captions with.
BREAKS = ("\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
CAPTIONS = [f"a dog{c}on a mat" for c in BREAKS] + ["".join(BREAKS).join("xyz"), "a cat\x1fasleep"]


def text_file(lines, ends):
  """`lines` joined by the line ends `ends` (cycled), one after the last line too."""
  return "".join(line + ends[i % len(ends)] for i, line in enumerate(lines))


def test_split_lines_breaks_at_line_feeds_only():
  text = text_file(CAPTIONS, ["\n", "\r\n"])
  assert len(text.splitlines()) > len(CAPTIONS)  # what str.splitlines would make of it
  assert split_lines(text) == CAPTIONS
  assert split_lines(text.rstrip("\n")) == CAPTIONS  # no final line feed
  assert split_lines("a\n\nb\r\n\r\n") == ["a", "", "b", ""]
  assert split_lines("a\rb\r\n") == ["a\rb"]  # a lone carriage return is text
  assert not split_lines("")


def test_embed_reads_one_caption_per_line(tmp_path):
  lines = ["a photo\u2028of a cat", "two\x85dogs", "a\fb\vc", "x\ry\x1ez"]
  path = tmp_path / "captions.txt"
  path.write_bytes(text_file(lines, ["\r\n", "\n"]).encode("utf-8"))
  assert load_texts(str(path)) == lines

  config = CLIPConfig(16, vision_tower(64, 1, 8, image_size=16),
                      text_tower(64, 1, context_length=16, vocab_size=49408))
  ckpt = tmp_path / "ckpt"
  rng = np.random.default_rng(0)
  weights = jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape, np.float32),
                         param_shapes(config))
  model_io.save_model(ckpt, weights, config)
  out = tmp_path / "out.npz"
  assert main([f"--checkpoint={ckpt}", f"--texts={path}", f"--output={out}"]) == 0
  assert np.load(out)["text_embeds"].shape == (len(lines), 16)


def test_eval_wds_captions_one_per_line(tmp_path):
  sets = [CAPTIONS[:4], CAPTIONS[4:5], CAPTIONS[5:]]
  items = []
  for (key, parts), caps in zip(make_shards.samples(len(sets), 24, 0), sets):
    parts["txt"] = text_file(caps, ["\n", "\r\n"]).encode("utf-8")
    items.append((key, parts))
  make_shards.write_tar(str(tmp_path / "00000.tar"), items)
  got = [caps for _, caps in retrieval.wds_pairs(f"{tmp_path}/00000.tar")]
  assert got == sets


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  import tfds_fixtures  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("tfds_breaks"))
  sets = [CAPTIONS[:3], CAPTIONS[3:4], CAPTIONS[4:7], CAPTIONS[7:], ["plain"],
          ["two\x1fparts", "\x1fleading separator", "one more\u2028caption"]]
  tfds_fixtures.build_coco_captions(d, n=len(sets), shards=2, captions=sets)
  return d, sets


def tfds_stream(d, batches):
  cfg = defaults.base_config().data
  cfg.update(kind="tfds", train="", tfds_name="coco_captions", data_dir=d, tfds_split="train",
             shards_per_window=2, shuffle_buffer=8)
  src = pipeline.make_train_input(cfg, 32, 16, 3)
  out = []
  for _ in range(batches):
    b = src.next_batch()
    out += list(zip(b["keys"], b["captions"]))
  return out


def test_tfds_training_picks_whole_captions(coco_dir):
  d, sets = coco_dir
  stream = tfds_stream(d, 8)  # 4 epochs of 6 images
  chosen = {}
  for key, caption in stream:
    chosen.setdefault(key, set()).add(caption)
  assert len(chosen) == len(sets)
  # Each image's picks are whole captions of its own set (the sets are disjoint).
  owners = [[i for i, s in enumerate(sets) if c <= set(s)] for c in chosen.values()]
  assert sorted(sum(owners, [])) == list(range(len(sets))), (owners, chosen)
  assert any(len(c) > 1 for c in chosen.values())  # it still picks among several
  assert tfds_stream(d, 8) == stream  # the pick is a pure function of the position
