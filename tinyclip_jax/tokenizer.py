"""OpenAI CLIP's text tokenizer (byte-level BPE, vocab 49408) on the Rust `tokenizers` library.

Ids match OpenAI's `simple_tokenizer.py`: the same text cleaning (ftfy, double html-unescape,
whitespace collapse, lower-case), the same regex word split, the same byte-to-unicode table and
merges. The vocabulary and merges are derived from the packaged gz file at load time (no network).
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os
from typing import Sequence

import numpy as np
import regex
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer

DEFAULT_VOCAB_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
DEFAULT_CONTEXT_LENGTH = 77
# OpenAI's original special-token strings (open_clip renamed them `<start_of_text>`); HF uses these too.
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI reads only the first 48894 merge lines of the gz file.
_VOCAB_SIZE = 256 * 2 + _NUM_MERGES + 2

_SPECIALS = r"<\|startoftext\|>|<\|endoftext\|>"
_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# OpenAI's exact split (Python `regex`, IGNORECASE); used only on the rare texts holding a special string.
_OPENAI_SPLIT = regex.compile(_SPECIALS + "|" + _WORDS, regex.IGNORECASE)
# The same split for the Rust (Oniguruma) side. Text is lower-cased first, so IGNORECASE matters only
# where case folding reaches a lower-case char: 'ſ' folds to 's', and U+0345 folds to a letter, so
# OpenAI's negated class never matches it (it is dropped). Spelled out because `(?i)` in Oniguruma
# would also fold U+0345 into `[\p{L}]+`.
_RUST_WORDS = r"'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{0345}]+"
_WHITESPACE = regex.compile(r"\s+")  # OpenAI uses the `regex` module's \s, not `re`'s.


def _byte_table() -> list[tuple[int, str]]:
  """GPT-2/CLIP byte -> printable-char table, in OpenAI's order (which fixes ids 0..255).

    Printable bytes map to themselves; the other 68 bytes map to chr(256 + n) so that BPE never sees
    whitespace or control chars.
    """
  kept = [
      *range(ord("!"),
             ord("~") + 1), *range(ord("¡"),
                                   ord("¬") + 1), *range(ord("®"),
                                                         ord("ÿ") + 1)
  ]
  moved = [b for b in range(256) if b not in set(kept)]
  return [(b, chr(b)) for b in kept] + [(b, chr(256 + n)) for n, b in enumerate(moved)]


@functools.lru_cache(maxsize=None)
def load_vocab_and_merges(
    vocab_path: str = DEFAULT_VOCAB_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary (token -> id, 49408 entries) and merges, built from OpenAI's gz file as OpenAI does."""
  with gzip.open(vocab_path) as f:  # bytes, then split on "\n" only, exactly as OpenAI
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]  # line 0 is a version header
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(
        f"{vocab_path} is not OpenAI's bpe_simple_vocab_16e6.txt.gz; pass that file as vocab_path.")
  chars = [c for _, c in _byte_table()]
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT]
  vocab = {t: i for i, t in enumerate(tokens)}
  assert len(vocab) == _VOCAB_SIZE, len(vocab)  # duplicates would shift ids
  return vocab, merges


def _bpe_model(vocab, merges, unk_token=None) -> models.BPE:
  # end_of_word_suffix reproduces OpenAI's `word[-1] + '</w>'`; no prefix on inner pieces.
  return models.BPE(
      vocab=vocab,
      merges=merges,
      continuing_subword_prefix="",
      end_of_word_suffix="</w>",
      fuse_unk=False,
      unk_token=unk_token)


@functools.lru_cache(maxsize=None)
def _backend(vocab_path: str) -> _RustTokenizer:
  """Rust tokenizer for cleaned text: word split + byte mapping + BPE (cleaning stays in Python)."""
  tok = _RustTokenizer(_bpe_model(*load_vocab_and_merges(vocab_path)))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_RUST_WORDS), behavior="removed",
                           invert=True),  # keep matches, drop rest
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  return tok


def clean_text(text: str) -> str:
  """OpenAI's cleaning: ftfy, html-unescape twice, strip, collapse whitespace, strip, lower-case."""
  # ftfy is imported here, not with the module: steps on random tokens (benchmarks/gpu_check.py)
  # run where it is not installed.
  import ftfy  # pylint: disable=import-outside-toplevel
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(" ", text).strip().lower()


def _check_context_length(context_length) -> int:
  if isinstance(context_length, bool) or not isinstance(context_length,
                                                        (int, np.integer)) or context_length < 2:
    raise ValueError(f"context_length must be an int >= 2 (room for the start and end tokens), got "
                     f"{context_length!r}; pass e.g. context_length=77.")
  return int(context_length)


def _check_text(text, where: str) -> str:
  if not isinstance(text, str):
    raise ValueError(
        f"{where} is a {type(text).__name__}, not a str; pass a str or a sequence of str "
        f"(decode bytes with .decode('utf-8') first).")
  return text


class Tokenizer:
  """CLIP tokenizer: `tok(texts) -> int32 [N, context_length]` of sot + BPE ids + eot, 0-padded."""

  def __init__(self,
               vocab_path: str | os.PathLike | None = None,
               context_length: int = DEFAULT_CONTEXT_LENGTH):
    self.vocab_path = os.path.abspath(
        os.fspath(vocab_path if vocab_path is not None else DEFAULT_VOCAB_PATH))
    self.context_length = _check_context_length(context_length)
    self._tok = _backend(self.vocab_path)
    vocab, _ = load_vocab_and_merges(self.vocab_path)
    self._id_to_token = list(vocab)  # vocab is built in id order
    self._special_ids = {SOT_TEXT: vocab[SOT_TEXT], EOT_TEXT: vocab[EOT_TEXT]}
    self._byte_of = {c: b for b, c in _byte_table()}

  @property
  def sot_token_id(self) -> int:
    return self._special_ids[SOT_TEXT]

  @property
  def eot_token_id(self) -> int:
    return self._special_ids[EOT_TEXT]

  @property
  def vocab_size(self) -> int:
    return len(self._id_to_token)

  def _split_specials(self, text: str) -> list[str | int]:
    """Cleaned text -> plain-text segments and special ids, where OpenAI's split finds a special string."""
    if SOT_TEXT not in text and EOT_TEXT not in text:
      return [text]  # the common case: skip the Python regex scan
    out, start = [], 0
    for m in _OPENAI_SPLIT.finditer(text):
      if m.group() in self._special_ids:
        # Segments can be split independently: OpenAI's scan restarts after each match anyway.
        out += [text[start:m.start()], self._special_ids[m.group()]]
        start = m.end()
    return out + [text[start:]]

  def _encode_cleaned(self, texts: list[str]) -> list[list[int]]:
    parts = [self._split_specials(t) for t in texts]
    plain = [p for ps in parts for p in ps if isinstance(p, str)]
    encoded = iter(self._tok.encode_batch(plain, add_special_tokens=False))
    return [
        [i for p in ps for i in ((p,) if isinstance(p, int) else next(encoded).ids)] for ps in parts
    ]

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text, without start/end tokens and without truncation."""
    return self._encode_cleaned([clean_text(_check_text(text, "text"))])[0]

  def decode(self, ids) -> str:
    """Text of `ids` as OpenAI decodes it (`</w>` -> space), skipping sot and stopping at the first eot
        (so a padded row decodes cleanly); surrounding whitespace is stripped."""
    pieces = []
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if i == self.eot_token_id:
        break
      if not 0 <= i < self.vocab_size:
        raise ValueError(
            f"token id {i} is outside the vocabulary [0, {self.vocab_size}); pass ids from this tokenizer."
        )
      if i != self.sot_token_id:
        pieces.append(self._id_to_token[i])
    # Bytes first, then '</w>' -> ' ', in OpenAI's order ('<', '/', 'w', '>' map to themselves).
    data = bytearray(self._byte_of[c] for c in "".join(pieces))
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    n_ctx = self.context_length if context_length is None else _check_context_length(context_length)
    if isinstance(texts, str):
      texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
      _check_text(texts, "texts")
    texts = [_check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
    out = np.zeros((len(texts), n_ctx), dtype=np.int32)  # 0-padding, as OpenAI
    for row, ids in zip(out, self._encode_cleaned([clean_text(t) for t in texts])):
      ids = [self.sot_token_id, *ids, self.eot_token_id]
      if len(ids) > n_ctx:  # truncate but keep the end token last: CLIP pools at the eot position
        ids = ids[:n_ctx]
        ids[-1] = self.eot_token_id
      row[:len(ids)] = ids
    return out


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
  """The process-wide default tokenizer (built once)."""
  return Tokenizer()


def tokenize(texts: str | Sequence[str],
             context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
  """Tokenize with the default tokenizer: int32 array [N, context_length]."""
  return get_tokenizer()(texts, context_length)


def _hf_backend(vocab, merges) -> _RustTokenizer:
  """The same pipeline as transformers' CLIPTokenizer(Fast), for tokenizer.json. No ftfy/html there:
    HF's fast tokenizer differs from OpenAI on html entities and mojibake, by HF's design."""
  tok = _RustTokenizer(_bpe_model(vocab, merges, unk_token=EOT_TEXT))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(),
       normalizers.Replace(Regex(r"\s+"), " "),
       normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPECIALS + "|" + _WORDS), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.RobertaProcessing((EOT_TEXT, vocab[EOT_TEXT]),
                                                    (SOT_TEXT, vocab[SOT_TEXT]),
                                                    trim_offsets=False,
                                                    add_prefix_space=False)
  tok.add_special_tokens(
      [AddedToken(t, normalized=True, special=True) for t in (SOT_TEXT, EOT_TEXT)])
  return tok


def write_hf_files(directory: str | os.PathLike,
                   vocab_path: str | os.PathLike | None = None,
                   context_length: int = DEFAULT_CONTEXT_LENGTH) -> list[str]:
  """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json so
    that transformers' CLIPTokenizer / CLIPTokenizerFast load `directory` offline. Returns the paths."""
  vocab, merges = load_vocab_and_merges(
      os.path.abspath(os.fspath(vocab_path or DEFAULT_VOCAB_PATH)))
  os.makedirs(directory, exist_ok=True)
  specials = {
      "bos_token": SOT_TEXT,
      "eos_token": EOT_TEXT,
      "unk_token": EOT_TEXT,
      "pad_token": EOT_TEXT
  }
  config = {
      **specials, "tokenizer_class": "CLIPTokenizer",
      "model_max_length": _check_context_length(context_length),
      "do_lower_case": True,
      "errors": "replace",
      "add_prefix_space": False,
      "clean_up_tokenization_spaces": False
  }
  contents = {
      "vocab.json": json.dumps(vocab, ensure_ascii=False),
      "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
      "tokenizer_config.json": json.dumps(config, indent=2),
      "special_tokens_map.json": json.dumps(specials, indent=2),
      "tokenizer.json": _hf_backend(vocab, merges).to_str(),
  }
  paths = []
  for name, text in contents.items():
    paths.append(os.path.join(directory, name))
    with open(paths[-1], "w", encoding="utf-8") as f:
      f.write(text)
  return paths
