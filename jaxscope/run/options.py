"""``jaxscope train``'s options and ``docs/train_options.md``, generated from
:class:`~jaxscope.run.config.TrainConfig`'s field metadata (a new option is written once)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["CliOption", "cli_options", "options_markdown"]


class CliOption(NamedTuple):
  """One ``jaxscope train`` option, generated from a :class:`TrainConfig` field."""

  field: str
  """The field's name (the argparse ``dest``)."""
  flags: tuple[str, ...]
  """Option strings, e.g. ``("-l", "--lr", "--learning-rate")``."""
  group: str
  help: str
  default: Any
  parse: Callable[[str], Any] | None
  """Parser of the value text (raises ``ValueError``); ``None`` for plain strings."""
  choices: tuple[str, ...] | None
  switch: str | None
  """``"on"``: the flag sets ``True``; ``"off"``: the flag sets ``False``; ``None``: takes
  a value."""
  metavar: str | None


def cli_options() -> list[CliOption]:
  """The ``jaxscope train`` options, one per :class:`TrainConfig` field, in field order."""
  from jaxscope.run.config import TrainConfig

  out = []
  for f in dataclasses.fields(TrainConfig):
    m = f.metadata
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    dashed = f.name.replace("_", "-")
    flags = m["flags"] or ((f"--no-{dashed}",) if m["switch"] == "off" else (f"--{dashed}",))
    out.append(
      CliOption(
        f.name,
        flags,
        m["group"],
        m["help"],
        default,
        m["parse"],
        m["choices"],
        m["switch"],
        m["metavar"],
      )
    )
  return out


def _shown(value: Any) -> str:
  if isinstance(value, float) and math.isfinite(value):
    return f"{value:g}"
  if value == {}:
    return "{}"
  return "none" if value is None else str(value)


def options_markdown() -> str:
  """The options table of ``docs/train_options.md``: one row per :class:`TrainConfig`
  field (flags, field, default, meaning), grouped as ``jaxscope train --help`` shows them."""
  from jaxscope.run.config import _GROUPS

  lines = []
  for group in _GROUPS:
    lines += [f"### {group}", "", "| flag | field | default | meaning |", "|---|---|---|---|"]
    for o in cli_options():
      if o.group != group:
        continue
      flags = ", ".join(f"`{s}`" for s in o.flags)
      default = _shown(o.default)
      text = o.help.replace("|", "\\|")
      lines.append(f"| {flags} | `{o.field}` | `{default}` | {text} |")
    lines.append("")
  return "\n".join(lines)
