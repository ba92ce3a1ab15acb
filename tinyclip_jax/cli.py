"""What every command-line tool of the package shares: bad input is one sentence on
stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class UsageError(ValueError):
  """A command line that cannot be carried out."""


class Parser(argparse.ArgumentParser):
  """argparse that raises UsageError (one sentence with the usage) instead of exiting."""

  def __init__(self, *args, usage_line: str, **kwargs):
    super().__init__(*args, **kwargs)
    self._usage_line = usage_line

  def error(self, message):
    raise UsageError(f"{message}; usage: {self._usage_line}")


def one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror}: {e.filename}." if e.filename else f"{e.strerror}."
  return " ".join(str(e).split())


def run_main(run: Callable[[list[str]], object], argv: Sequence[str] | None) -> int:
  """Calls run(argv); a ValueError or OSError becomes `error: …` and exit code 2."""
  try:
    run(sys.argv[1:] if argv is None else list(argv))
  except (ValueError, OSError) as e:  # UsageError, CheckpointError, ConfigError included
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  return 0
