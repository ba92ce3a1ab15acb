r"""Caption text with one caption per line (embed's --texts files, a webdataset
KEY.txt read by the retrieval evaluation).

Lines end at "\n" only. `str.splitlines` also breaks at \v, \f, a lone \r, \x1c,
\x1d, \x1e, U+0085, U+2028 and U+2029, which scraped captions do hold; each one
would turn a caption into several and shift every later row.
"""
from __future__ import annotations


def split_lines(text: str) -> list[str]:
  r"""The lines of `text`: split at "\n", a trailing "\r" of each line dropped (CRLF
  files), and no empty last line after a final "\n" (as `splitlines`)."""
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str) -> list[str]:
  r"""`split_lines` of a UTF-8 file, read without newline translation (which would
  turn a lone "\r" inside a caption into a line break)."""
  with open(path, encoding="utf-8", newline="") as f:
    return split_lines(f.read())
