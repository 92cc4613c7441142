"""What the sub-commands of ``jaxscope`` share: the help format and value parsers."""

from __future__ import annotations

import argparse
from typing import Any


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults and keeps the line breaks of a help text (each line is wrapped)."""

  def _split_lines(self, text: str, width: int) -> list[str]:
    lines: list[str] = []
    for line in text.splitlines():
      lines.extend(super()._split_lines(line, width) or [""])
    return lines


def _argparse_type(parse: Any) -> Any:
  """A config value parser (raising ``ValueError``) as an argparse ``type``."""

  def convert(text: str) -> Any:
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  convert.__name__ = getattr(parse, "__name__", "value")
  return convert
