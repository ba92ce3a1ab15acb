"""CLIP tokenizer: ids must equal OpenAI's on tricky text; HF export files must load offline.

transformers 5 has no slow (python, ftfy) CLIPTokenizer any more, so the OpenAI reference here is a
small pure-python re-statement of OpenAI's algorithm (`_ref_encode`), and transformers' CLIPTokenizer
(built from vocab.json/merges.txt this test derives itself) is a second, independent BPE fed text
cleaned the OpenAI way (HF does no ftfy/html-unescape by design).
"""
import functools
import gzip
import html
import json
import random

import ftfy
import numpy as np
import pytest
import regex

from tinyclip_jax import tokenizer as T

SOT, EOT, C = 49406, 49407, 77
LONG = " ".join(f"word{i} and, more!" for i in range(60))  # ~300 tokens

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "",
    " ",
    " \t\n\r  \u00a0\u3000 ",
    "café naïve résumé Ångström",
    "e\u0301 a\u0300 n\u0303 (combining marks)",
    "ǅ İstanbul ΣΑΣ ß ẞ",
    "中文字符 日本語のテキスト 한국어",
    "مرحبا بالعالم",
    "Привет, мир!",
    "ﬁne ＡＢＣ１２３ ½ ²",
    "👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &nbsp;x",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "cafÃ© Ã¼ber",
    "multiple   spaces\t\ttabs\n\nnewlines",
    "!!!???... --- ,,, ;;; (([[{{}}]])) @#$%^&*",
    "don't I'LL we're they've I'm she'd it's 'tis ''s",
    "123,456.78 3.14159 2024-01-01 0x1F 1e10",
    "snake_case camelCase kebab-case URL: https://x.org/a?b=c",
    "quote “curly” ‘single’ – dash — em…",
    "tab\tsep\u200bzero-width\u200dzwj\ufeffbom",
    "a" * 300,
    LONG,
]
# Only against OpenAI's rules: HF's Rust split / added-token matching differs on these by design.
OPENAI_ONLY = [
    "<|startoftext|>hi<|endoftext|>", "x<<|endoftext|> <|ENDOFTEXT|> a<|endoftext|>b",
    "<|endoftext", "'ſ ſ's", "a\u0345b ᾳ"
]


# ---- independent OpenAI reference (pure python) -----------------------------------------------------
def _gpt2_bytes():
  kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  rest = sorted(set(range(256)) - set(kept))
  return list(zip(kept + rest, [chr(b) for b in kept] + [chr(256 + i) for i in range(len(rest))]))


@functools.lru_cache(maxsize=None)
def _ref_tables():
  with gzip.open(T.DEFAULT_VOCAB_PATH) as f:
    merges = [tuple(m.split()) for m in f.read().decode("utf-8").split("\n")[1:48895]]
  chars = [c for _, c in _gpt2_bytes()]
  vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges
                                                ] + ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(vocab)}, merges, {m: r for r, m in enumerate(merges)}


@functools.lru_cache(maxsize=None)
def _ref_bpe(word: str) -> tuple:
  ranks = _ref_tables()[2]
  parts = list(word[:-1]) + [word[-1] + "</w>"]
  while len(parts) > 1:
    rank, pair = min((ranks.get(p, float("inf")), p) for p in zip(parts, parts[1:]))
    if rank == float("inf"):
      break
    merged, i = [], 0
    while i < len(parts):  # merge every non-overlapping occurrence, left to right
      if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
        merged.append(parts[i] + parts[i + 1])
        i += 2
      else:
        merged.append(parts[i])
        i += 1
    parts = merged
  return tuple(parts)


_REF_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
    r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def _ref_clean(text):
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


def _ref_encode(text):
  vocab, byte_char = _ref_tables()[0], dict(_gpt2_bytes())
  ids = []
  for piece in _REF_SPLIT.findall(_ref_clean(text)):
    if piece in ("<|startoftext|>", "<|endoftext|>"):
      ids.append(vocab[piece])
    else:
      ids += [vocab[p] for p in _ref_bpe("".join(byte_char[b] for b in piece.encode("utf-8")))]
  return ids


def _expected_batch(id_lists, n_ctx=C):
  out = np.zeros((len(id_lists), n_ctx), np.int32)
  for row, ids in zip(out, id_lists):
    ids = [SOT, *ids, EOT]
    if len(ids) > n_ctx:
      ids = ids[:n_ctx - 1] + [EOT]
    row[:len(ids)] = ids
  return out


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
  return T.Tokenizer()


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
  """transformers' CLIPTokenizer from vocab.json + merges.txt derived here, not by write_hf_files."""
  transformers = pytest.importorskip("transformers")
  d = tmp_path_factory.mktemp("hf_ref")
  vocab, merges, _ = _ref_tables()
  (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (d / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
  return transformers.CLIPTokenizer.from_pretrained(str(d), local_files_only=True)


# ---- parity ------------------------------------------------------------------------------------------
def test_reference_sanity():
  vocab = _ref_tables()[0]
  assert len(vocab) == 49408 and vocab["<|startoftext|>"] == SOT and vocab["<|endoftext|>"] == EOT
  assert _ref_encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # well-known CLIP ids


@pytest.mark.parametrize("text", CORPUS + OPENAI_ONLY)
def test_encode_matches_openai(tok, text):
  assert tok.encode(text) == _ref_encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_hf_on_cleaned_text(tok, hf_reference, text):
  assert tok.encode(text) == hf_reference(_ref_clean(text), add_special_tokens=False)["input_ids"]


def test_batch_matches_references(tok, hf_reference):
  got = tok(CORPUS + OPENAI_ONLY)
  np.testing.assert_array_equal(got,
                                _expected_batch([_ref_encode(t) for t in CORPUS + OPENAI_ONLY]))
  hf_ids = [hf_reference(_ref_clean(t), add_special_tokens=False)["input_ids"] for t in CORPUS]
  np.testing.assert_array_equal(got[:len(CORPUS)], _expected_batch(hf_ids))


def test_random_strings_match_openai(tok):
  rng = random.Random(0)
  alphabet = list("abcXYZ  '\t\n.,!?-—0123456789éüßſ中文日本العربيةе́👍🏽‍🇫🇷&;<>|") + [
      "'s", "'LL", "&amp;", "&lt;", "Ã©", "don't", "<|endoftext|>", "\u0345", "\u00a0"
  ]
  texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(400)]
  np.testing.assert_array_equal(tok(texts), _expected_batch([_ref_encode(t) for t in texts]))


def test_truncation_keeps_eot_last(tok):
  ids = _ref_encode(LONG)
  assert len(ids) > C
  row = tok(LONG)[0]
  assert row[0] == SOT and row[C - 1] == EOT and (row != 0).all()
  np.testing.assert_array_equal(row[1:C - 1], ids[:C - 2])
  # exactly fitting: no truncation, eot still at the end
  fit = tok.decode(tok(" ".join(["cat"] * (C - 2)))[0])
  assert fit == " ".join(["cat"] * (C - 2))
  assert tok(" ".join(["cat"] * (C - 1)))[0, C - 1] == EOT


def test_empty_and_whitespace(tok):
  for text in ["", "   ", "\t\n"]:
    assert tok.encode(text) == []
    np.testing.assert_array_equal(tok(text)[0, :3], [SOT, EOT, 0])


# ---- API ---------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_properties(tok):
  assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (SOT, EOT, 49408)
  for texts, n in [("one", 1), (["a", "b", "c"], 3), ((), 0), (np.array(["x", "y"]), 2)]:
    out = tok(texts)
    assert out.dtype == np.int32 and out.shape == (n, C)
  assert tok(["a dog"], context_length=5).shape == (1, 5)
  np.testing.assert_array_equal(tok("a dog cat", context_length=2)[0], [SOT, EOT])
  assert T.Tokenizer(context_length=16)("x").shape == (1, 16)
  out = T.tokenize(["a photo of a cat", "x"])
  assert out.dtype == np.int32 and out.shape == (2, C)
  np.testing.assert_array_equal(out[0, :7], [SOT, 320, 1125, 539, 320, 2368, EOT])
  assert T.tokenize("x", context_length=10).shape == (1, 10)


def test_backend_is_cached():
  assert T.Tokenizer()._tok is T.Tokenizer()._tok and T.get_tokenizer() is T.get_tokenizer()


def test_decode_round_trip(tok):
  for text in ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "hello world 42"]:
    expected = text.replace("42", "4 2")  # OpenAI encodes digits one by one, each a word
    assert tok.decode(tok.encode(text)) == expected
    assert tok.decode(tok(text)[0]) == expected  # padded row: sot skipped, stops at eot
  assert tok.decode(tok.encode("café 中文")) == "café 中文"
  assert tok.decode([]) == ""


@pytest.mark.parametrize("bad", [1, 0, -3, 1.5, "77", True])
def test_bad_context_length(tok, bad):
  for call in (lambda: tok("x", context_length=bad), lambda: T.tokenize("x", context_length=bad),
               lambda: T.Tokenizer(context_length=bad)):
    with pytest.raises(ValueError, match=r"context_length must be an int >= 2"):
      call()


@pytest.mark.parametrize("bad, where", [([1], r"texts\[0\] is a int"),
                                        (["ok", None], r"texts\[1\] is a NoneType"),
                                        (b"bytes", "texts is a bytes"),
                                        (None, "texts is a NoneType"), (5, "texts is a int")])
def test_bad_texts(tok, bad, where):
  with pytest.raises(ValueError, match=where + r", not a str; pass a str or a sequence of str"):
    tok(bad)


def test_bad_encode_decode(tok):
  with pytest.raises(ValueError, match="text is a bytes, not a str"):
    tok.encode(b"x")
  with pytest.raises(ValueError, match="token id 49408 is outside the vocabulary"):
    tok.decode([49408])


def test_bad_vocab_file(tmp_path):
  path = tmp_path / "bad.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write("#version\na b\n")
  with pytest.raises(ValueError, match="is not OpenAI's bpe_simple_vocab_16e6.txt.gz"):
    T.Tokenizer(vocab_path=path)


# ---- HF export ---------------------------------------------------------------------------------------
def test_write_hf_files_load_in_transformers(tok, tmp_path):
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer as RustTokenizer

  T.write_hf_files(tmp_path)
  names = {
      "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
      "special_tokens_map.json"
  }
  assert names <= {p.name for p in tmp_path.iterdir()}
  # the same vocab/merges as derived independently above
  assert json.loads((tmp_path / "vocab.json").read_text("utf-8")) == _ref_tables()[0]
  texts = [t for t in CORPUS if "&" not in t and "Ã" not in t]  # HF itself does no html/ftfy fixing
  rust = RustTokenizer.from_file(str(tmp_path /
                                     "tokenizer.json"))  # what transformers 4.x fast loads
  for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast,
              transformers.AutoTokenizer):
    hf = cls.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.bos_token, hf.eos_token, hf.pad_token,
            hf.unk_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.model_max_length) == (SOT, EOT,
                                                                                        EOT, C)
    for t in texts:
      want = [SOT, *tok.encode(_ref_clean(t)), EOT]
      assert hf(_ref_clean(t))["input_ids"] == want, t
      assert rust.encode(_ref_clean(t)).ids == want, t
    plain = "A Photo of a CAT, don't  worry"  # HF's own normalizer suffices here
    assert hf(plain)["input_ids"] == [SOT, *tok.encode(plain), EOT]
