"""Shared pieces of the command-line entry points: one-line errors, flag parsing, quiet logs."""

from __future__ import annotations

import functools
import logging as std_logging
import sys
from collections.abc import Callable

from absl import flags


class QuietLibraries(std_logging.Filter):
  """Drops INFO records of Orbax (several lines per checkpoint); its warnings still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def one_line(error: BaseException) -> str:
  """An error's message on one line (a KeyError's without the quotes repr adds)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(text).split())


def _parse_flags(name: str, argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{name}: error: {one_line(e)}\nPass --help for the flags.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # Raised by config overrides.
    sys.exit(f"{name}: config error: {one_line(e)}")


def flags_parser(name: str) -> Callable[[list[str]], list[str]]:
  """absl flag parsing where a config typo or bad override is one clear line, not a traceback."""
  return functools.partial(_parse_flags, name)
