"""``--capacity``: the options of a dynamic-capacity run (:mod:`jaxscope.models.growth`),
parsed and checked (re-exported by :mod:`jaxscope.run.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxscope.models import capacity as cap
from jaxscope.models import growth

__all__ = ["CAPACITY_DEFAULTS", "parse_capacity"]

#: Defaults of ``--capacity`` (the thesis: chunks of a fifth or a tenth, patience 10; the
#: plateau rule restarted after each expansion, the output bias kept trainable).
CAPACITY_DEFAULTS: dict[str, Any] = {
  "chunks": 5,
  "patience": 10,
  "policy": "all",
  "cooldown": 0,
  "min_delta": 0.0,
  "smoothing": 0.1,
  "reinit": True,
  "reset": True,
  "keep": "bias",
}

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool(key: str, value: Any) -> bool:
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in _TRUE or text in _FALSE:
    return text in _TRUE
  raise ValueError(f"--capacity: {key} must be true or false, got {value!r}.")


def parse_capacity(spec: str | Mapping[str, Any]) -> dict[str, Any]:
  """Parses ``--capacity`` (``"chunks=5,patience=10,policy=all,cooldown=300,reinit=false"``).

  Keys (:func:`jaxscope.models.growth.growth_update`):

  * ``chunks``: chunks per capacity layer, ≥ 2;
  * ``patience``: counted steps without improvement of the moving average of the training
    loss that make a plateau, ≥ 1;
  * ``policy``: ``all`` (every layer with room grows on a plateau, as the thesis did) or
    ``activation-std`` (the layer whose active units' outputs have the highest standard
    deviation);
  * ``cooldown``: steps at the start and after each expansion during which no plateau is
    counted or signalled (the time a new chunk needs to train), ≥ 0;
  * ``min_delta``: relative improvement of the average that counts, ≥ 0;
  * ``smoothing``: weight of the newest loss in the moving average, in (0, 1];
  * ``reinit``: re-draw a new chunk for its active fan-in with the model's ``kernel_init``
    (``false``: keep the weights the full-width initialisation drew, as the thesis);
  * ``reset``: restart the plateau rule (moving average, patience counter) after each
    expansion (``false``: the behaviour before the fix);
  * ``keep``: what stays trainable after an expansion besides the new chunks, in the
    layers that are not capacity layers: ``new`` (nothing), ``bias`` (the output layer's
    bias) or ``output`` (the whole output layer).

  Missing keys take :data:`CAPACITY_DEFAULTS`; ``true``/``false`` (or ``1``/``0``,
  ``yes``/``no``) for the switches.
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
    if kind is bool:
      out[k] = _bool(k, v)
      continue
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
  if out["keep"] not in cap.KEEP:
    raise ValueError(f"--capacity: keep must be one of {cap.KEEP}, got {out['keep']!r}.")
  return out
