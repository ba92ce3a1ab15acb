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


def parse_absl_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag or config field is one sentence and exit 2
  (absl and ml_collections would print a traceback or usage text and exit 1)."""
  import re  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.get("seed")  # a config file that failed to load raises when first read
    return rest
  except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD the config lacks
    text = str(e).replace("\\", "")
    missing = re.search(r"'(\w+)'", text)
    name = missing.group(1) if missing else ""
    flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and
                 name in a.split("=", 1)[0].split(".")), "a --config.FIELD flag")
    hint = re.search(r'Did you mean "(\w+)"', text)
    fix = f"did you mean {hint.group(1)!r}?" if hint else "check the spelling"
    msg = (f"{flag} names no field of the config ({fix}); every field and its default is in "
           "tinyclip_jax/train/defaults.py.")
    if flag == "--config.eval.kind":  # a retired field: say what replaced it
      from tinyclip_jax.eval import suite  # pylint: disable=import-outside-toplevel
      msg = f"{flag}: {suite.KIND_RETIRED}"
  except (flags.Error, OSError) as e:  # bad value, unknown flag, missing config file
    msg = " ".join(str(e).split()).rstrip(".") + "; see --helpfull for the flags."
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)
