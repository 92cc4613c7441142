"""Heat maps of per-layer metrics across a stack of layers (``nn.scan`` / ``nnx.scan`` models).

A scope built with ``stacked={"^blocks": 0}`` records one series per layer of a stacked
leaf: ``updates/ratio/blocks/0/attn/query/kernel`` … ``blocks/{L-1}/…``. Drawn as lines
they are ``L`` nearly identical curves per leaf; drawn as a heat map (step × layer index)
the depth structure shows: which layers move fastest, where the attention logits grow,
whether the top or the bottom of the stack stalls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from jaxscope.plot._common import column_bounds, log_worthy, masked, scalar_series
from jaxscope.record import History

__all__ = ["stack_families", "stack_figure"]

_INDEXED = re.compile(r"^(?:(?P<prefix>.*?)/)?(?P<index>\d+)/(?P<rest>.+)$")


def stack_families(layers: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
  """Groups per-layer names of stacked leaves by leaf: ``{"blocks/*/fc/kernel": [(0,
  "blocks/0/fc/kernel"), (1, …), …]}``, indices ascending; only families of at least two
  layers. The family name has ``*`` where the layer index was (the first integer path
  component)."""
  families: dict[str, list[tuple[int, str]]] = {}
  for lay in layers:
    m = _INDEXED.match(lay)
    if m is None:
      continue
    prefix = f"{m['prefix']}/" if m["prefix"] else ""
    families.setdefault(f"{prefix}*/{m['rest']}", []).append((int(m["index"]), lay))
  return {k: sorted(v) for k, v in families.items() if len(v) >= 2}


def stack_figure(
  history: History,
  topic: str,
  stat: str,
  *,
  families: Sequence[str] | None = None,
  logy: bool | None = None,
  max_panels: int = 12,
) -> Figure:
  """Heat maps (step × layer index) of ``{topic}/{stat}`` for each stacked leaf.

  Args:
    history: the recorded run.
    topic: e.g. ``"updates"``.
    stat: e.g. ``"ratio"``.
    families: the leaves to draw, as :func:`stack_families` names them (default: all,
      up to ``max_panels``).
    logy: log colour scale; ``None`` picks it when every finite value is positive and
      they span more than two decades.
    max_panels: at most this many leaves are drawn (the first in recording order).

  Returns:
    A figure with one heat map per stacked leaf; non-finite values are left blank
    (white) so that a divergence stands out.

  Raises:
    KeyError: no stacked layers recorded under ``{topic}/{stat}``.
  """
  found = stack_families(history.layers(topic, stat))
  if families is not None:
    missing = [f for f in families if f not in found]
    if missing:
      raise KeyError(f"stack_figure: {missing} not recorded; stacked leaves: {list(found)}.")
    found = {f: found[f] for f in families}
  if not found:
    raise KeyError(
      f"stack_figure: no stacked layers (names with a layer index, e.g. blocks/0/...) under "
      f"{topic}/{stat}; record with scope(stacked=...)."
    )
  names = list(found)[:max_panels]
  grids = []
  for name in names:
    rows = [scalar_series(history, f"{topic}/{stat}/{lay}") for _, lay in found[name]]
    steps = np.unique(np.concatenate([s for s, _ in rows]))
    grid = np.full((len(rows), steps.size), np.nan)
    for r, (s, v) in enumerate(rows):
      grid[r, np.searchsorted(steps, s)] = v
    grids.append((name, steps, np.array([i for i, _ in found[name]]), grid))
  if logy is None:
    logy = log_worthy([g for *_, g in grids], 100.0)
  cols = min(3, len(names))
  nrows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(4.2 * cols, 2.8 * nrows + 0.6), layout="constrained")
  for k, (name, steps, index, grid) in enumerate(grids):
    ax = fig.add_subplot(nrows, cols, k + 1)
    shown = masked(grid, positive=bool(logy))
    finite = shown[np.isfinite(shown)]
    if logy and finite.size:
      norm: Normalize = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
    elif finite.size:
      norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max()))
    else:
      norm = Normalize(0.0, 1.0)
    mesh = ax.pcolormesh(
      column_bounds(steps), column_bounds(index), np.ma.masked_invalid(shown), norm=norm
    )
    fig.colorbar(mesh, ax=ax)
    ax.set_title(name, fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
  fig.suptitle(f"{topic}/{stat} per layer of the stack")
  return fig
