"""Step × layer heat maps of layer-stacked metrics."""

from __future__ import annotations

import numpy as np
import pytest

from jaxscope.plot import save_run_plots, stack_figure
from jaxscope.plot.stacks import stack_families
from jaxscope.record import History


def _history():
  rows = []
  for s in range(6):
    vals = {"loss": 1.0 / (s + 1), "updates/ratio/embed/kernel": 1e-3}
    for i in range(3):
      vals[f"updates/ratio/blocks/{i}/fc/kernel"] = (i + 1) * 1e-3 * (s + 1)
      vals[f"updates/ratio/blocks/{i}/ln/scale"] = float("nan") if (s, i) == (4, 2) else 0.5
    rows.append((s, vals))
  return History(rows)


def test_stack_families():
  fam = stack_families(["blocks/1/fc/kernel", "blocks/0/fc/kernel", "embed/kernel", "x/7/y"])
  assert fam == {"blocks/*/fc/kernel": [(0, "blocks/0/fc/kernel"), (1, "blocks/1/fc/kernel")]}
  assert stack_families(["0/a", "1/a"]) == {"*/a": [(0, "0/a"), (1, "1/a")]}


def test_stack_figure_grid_values(tmp_path):
  h = _history()
  fig = stack_figure(h, "updates", "ratio")
  assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
    "blocks/*/fc/kernel",
    "blocks/*/ln/scale",
  ]
  mesh = fig.axes[0].collections[0]
  grid = np.ma.getdata(mesh.get_array()).reshape(3, 6)
  np.testing.assert_allclose(grid[2, 3], 3 * 1e-3 * 4)  # layer 2, step 3
  ln = fig.axes[2].collections[0].get_array().reshape(3, 6)
  assert np.ma.is_masked(ln[2, 4]) and not np.ma.is_masked(ln[1, 4])  # NaN left blank
  with pytest.raises(KeyError, match="stacked"):
    stack_figure(h, "updates", "nothing")
  with pytest.raises(KeyError, match="not recorded"):
    stack_figure(h, "updates", "ratio", families=["blocks/*/attn"])
  names = [p.name for p in save_run_plots(h, tmp_path)]
  assert "updates_ratio_stack.png" in names and "updates_ratio.png" in names
