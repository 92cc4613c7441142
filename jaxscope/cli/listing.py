"""``jaxscope list-metrics``, ``list-models`` and ``list-datasets``."""

from __future__ import annotations

import argparse
from typing import Any

from jaxscope.cli.train import _ACTIVATION_HEALTH, _instrument_presets


def _plain(text: str) -> str:
  """A docstring fragment for the terminal: ``x`` → x, :func:`~a.b` → b."""
  import re

  text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
  return text.replace("``", "")


def _spec_text(spec: Any) -> str:
  """A preset entry: its registered name, or the stats of a configured metric's keys."""
  from jaxscope.metrics import registry

  if isinstance(spec, str):
    return spec
  stats = [k.split("/")[1] for k in registry.keys_of(spec)]
  return stats[0] + (f" (+{', '.join(stats[1:])})" if len(stats) > 1 else "")


def _list_metrics(args: argparse.Namespace) -> int:
  """``jaxscope list-metrics``: every key a scope or the instruments can report, with its
  definition, generated from the registry and the instruments' own tables."""
  from jaxscope.metrics import keys, registry
  from jaxscope.metrics.instruments import QUANTITIES
  from jaxscope.metrics.scope import TOPICS

  print(
    "Per-layer metrics: metrics.scope(params=[...], ...) or jaxscope train --metrics "
    "'NAME,NAME(ARG=VALUE)'\n"
    f"keys {{topic}}/{{stat}}/{{layer}}: topic one of {', '.join(TOPICS)}; layer the module "
    "path, e.g. Dense_0/kernel; arguments as in the signature, e.g. variance(ddof=1)"
  )
  network = []
  for name in registry.names():
    meta = registry.info(name)
    if not meta.keys[0].startswith("{topic}/"):
      network.append(meta)
      continue
    print(f"\n{name}{meta.signature}\n    {_plain(meta.summary)}")
    print(f"    keys: {', '.join(meta.keys)}")
    if meta.note:
      print(f"    convention: {meta.note}")
  print("\nNetwork metrics (scope(network=[...]), plain keys):")
  for meta in network:
    print(f"{meta.name:20s} key {meta.keys[0]}: {_plain(meta.summary)}")
  print()
  for preset in registry.SCOPE_PRESETS:
    lists = registry.preset_metrics(preset)
    desc = "; ".join(
      f"{t}: {', '.join(_spec_text(s) for s in specs)}" for t, specs in lists.items()
    )
    print(f"preset {preset:13s} {desc}")
  print()
  print("jaxscope train --metrics PRESET (Cockpit's configurations, with instruments):")
  for preset, desc in _instrument_presets().items():
    print(f"preset {preset:13s} {desc}")
  print(f"{'':20s} {_ACTIVATION_HEALTH}")
  print(
    "\nInstrument quantities: metrics.instruments([...]) or the presets above; keys per "
    "parameter leaf with {leaf} (its name, e.g. Dense_0/kernel); K_stderr is the standard "
    "error of reading K, K_residual a convergence residual bounding its error"
  )
  quantity = None
  for row in keys.instrument_key_table():
    if row.quantity != quantity:
      quantity = row.quantity
      presets = ", ".join(row.presets) or "no preset"
      print(f"\n{quantity} [{presets}]: {QUANTITIES[quantity]}")
    print(f"    {row.key}: {row.definition}")
  return 0


def _list_models(args: argparse.Namespace) -> int:
  from jaxscope import models

  for name in models.names():
    print(f"{name:14s} {models.describe(name)}")
  return 0


def _list_datasets(args: argparse.Namespace) -> int:
  from jaxscope import data

  for name in data.names():
    where = "embedded" if data.embedded(name) else "needs --data-dir"
    print(f"{name:14s} [{where}] {data.describe(name)}")
  return 0


# ------------------------------------------------------------------------------ analyze

# Options whose values may start with "-" (a negative range); argparse would take
# "--grid -1:1:21" for two options, so main() joins them into "--grid=-1:1:21".
