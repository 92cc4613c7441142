"""``--capacity``: the options of a dynamic-capacity run (:mod:`jaxscope.models.growth`),
parsed and checked (re-exported by :mod:`jaxscope.run.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxscope.models import growth

__all__ = ["CAPACITY_DEFAULTS", "parse_capacity"]

#: Defaults of ``--capacity`` (the thesis: chunks of a fifth or a tenth, patience 10).
CAPACITY_DEFAULTS: dict[str, Any] = {
  "chunks": 5,
  "patience": 10,
  "policy": "all",
  "cooldown": 0,
  "min_delta": 0.0,
  "smoothing": 0.1,
}


def parse_capacity(spec: str | Mapping[str, Any]) -> dict[str, Any]:
  """Parses ``--capacity`` (``"chunks=5,patience=10,policy=all|activation-std"``).

  Keys: ``chunks`` (chunks per capacity layer, ≥ 2), ``patience`` (steps without
  improvement of the moving average of the training loss that make a plateau, ≥ 1),
  ``policy`` (``all``: every layer with room grows on a plateau, as the thesis did;
  ``activation-std``: the layer whose active units' outputs have the highest standard
  deviation), ``cooldown`` (≥ 0), ``min_delta`` (relative improvement, ≥ 0) and
  ``smoothing`` (weight of the newest loss in the moving average, in (0, 1]). Missing keys
  take :data:`CAPACITY_DEFAULTS`.
  """
  out = dict(CAPACITY_DEFAULTS)
  if isinstance(spec, str):
    items = {}
    for part in (p.strip() for p in spec.split(",")):
      if not part:
        continue
      if "=" not in part:
        raise ValueError(f"--capacity: expected key=value, got {part!r} (in {spec!r}).")
      k, v = (t.strip() for t in part.split("=", 1))
      items[k] = v
  else:
    items = dict(spec)
  unknown = sorted(set(items) - set(CAPACITY_DEFAULTS))
  if unknown:
    raise ValueError(f"--capacity: unknown key(s) {unknown}; keys: {', '.join(CAPACITY_DEFAULTS)}.")
  for k, v in items.items():
    kind = type(CAPACITY_DEFAULTS[k])
    try:
      out[k] = kind(v) if kind is not str else str(v)
    except (TypeError, ValueError):
      raise ValueError(f"--capacity: {k} must be a {kind.__name__}, got {v!r}.") from None
  if out["chunks"] < 2:
    raise ValueError(f"--capacity: chunks must be >= 2, got {out['chunks']}.")
  if out["patience"] < 1 or out["cooldown"] < 0 or out["min_delta"] < 0:
    raise ValueError(f"--capacity: patience >= 1, cooldown >= 0, min_delta >= 0; got {out}.")
  if not 0.0 < out["smoothing"] <= 1.0:
    raise ValueError(f"--capacity: smoothing must be in (0, 1], got {out['smoothing']}.")
  if out["policy"] not in growth.POLICIES:
    raise ValueError(f"--capacity: policy must be one of {growth.POLICIES}, got {out['policy']!r}.")
  return out
