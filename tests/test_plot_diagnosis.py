"""Tests of jaxscope.plot.diagnosis: the panels behind each finding."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import dataclasses
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from jaxscope.plot import diagnosis_figure
from jaxscope.record import History, Recorder

STEPS = np.arange(10)
LOSS = np.where(STEPS == 7, np.inf, 1.0 / (STEPS + 1))
GRAD_A = 10.0 ** (-STEPS.astype(float))  # 1 … 1e-9: many decades
GRAD_B = 2.0 * 10.0 ** (-STEPS.astype(float))


@dataclasses.dataclass
class _Finding:
  """What diagnosis_figure reads of a :class:`jaxscope.diagnose.Finding`."""

  name: str
  severity: str
  summary: str
  evidence: dict[str, Any] = dataclasses.field(default_factory=dict)


def _history() -> History:
  records = []
  for s in STEPS:
    v = {
      "loss": LOSS[s],
      "grads/norm/a": GRAD_A[s],
      "grads/norm/b": GRAD_B[s],
      "grads/histogram_counts/a": [1, 2, 3],
      "updates/ratio/a": 1e-3,
    }
    records.append((int(s), v))
  return History(records)


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
  assert plt.get_fignums() == []
  yield
  assert plt.get_fignums() == []


def _vlines(ax):
  """x of the vertical lines (the evidence steps)."""
  out = []
  for ln in ax.get_lines():
    x = np.asarray(ln.get_xdata(), np.float64)
    if x.size == 2 and x[0] == x[1] and list(ln.get_ydata()) == [0, 1]:
      out.append(ln)
  return out


def test_diagnosis_figure_no_finding() -> None:
  fig = diagnosis_figure(_history(), [])
  (ax,) = fig.axes
  assert ax.get_title() == "no problem found"
  (line,) = ax.get_lines()
  np.testing.assert_array_equal(line.get_xdata(), STEPS)
  np.testing.assert_array_equal(line.get_ydata(), LOSS)
  assert ax.get_yscale() == "linear"  # 1 … 0.1
  assert ax.get_xlabel() == "step"
  assert fig.get_suptitle() == "diagnosis of a run"
  # No loss recorded: an empty panel, still titled.
  (ax,) = diagnosis_figure(History([(0, {"accuracy": 1.0})]), []).axes
  assert ax.get_title() == "no problem found" and not ax.get_lines()


def test_diagnosis_figure_evidence_series() -> None:
  finding = _Finding(
    "vanishing_gradients",
    "critical",
    "gradients shrink",
    {"metric": "grads/norm", "layers": ["a", "b", "nope"], "steps": [3, 5]},
  )
  fig = diagnosis_figure(_history(), [finding])
  (ax,) = fig.axes
  assert ax.get_title(loc="left") == "[critical] vanishing_gradients\ngradients shrink"
  lines = [ln for ln in ax.get_lines() if ln not in _vlines(ax)]
  assert [ln.get_label() for ln in lines] == ["grads/norm/a", "grads/norm/b"]
  np.testing.assert_array_equal(lines[0].get_xdata(), STEPS)
  np.testing.assert_allclose(lines[0].get_ydata(), GRAD_A)
  np.testing.assert_allclose(lines[1].get_ydata(), GRAD_B)
  assert ax.get_yscale() == "log"  # nine decades
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "value")
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["grads/norm/a", "grads/norm/b"]
  marks = _vlines(ax)
  assert [ln.get_xdata()[0] for ln in marks] == [3.0, 5.0]
  assert all(to_rgba(ln.get_color(), 1) == to_rgba("tab:red") for ln in marks)


def test_diagnosis_figure_nonfinite_and_single_key() -> None:
  finding = _Finding("divergence", "warning", "loss is inf", {"metric": "loss", "steps": [7]})
  (ax,) = diagnosis_figure(_history(), [finding]).axes
  (line,) = [ln for ln in ax.get_lines() if ln not in _vlines(ax)]
  # Non-finite values are left out of the line and marked at their step.
  np.testing.assert_array_equal(line.get_xdata(), STEPS[STEPS != 7])
  np.testing.assert_allclose(line.get_ydata(), LOSS[STEPS != 7])
  (marks,) = [c for c in ax.collections if "non-finite" in str(c.get_label())]
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [7])
  assert ax.get_ylabel() == "loss"
  assert ax.get_legend() is None
  (step,) = _vlines(ax)
  assert to_rgba(step.get_color(), 1) == to_rgba("tab:orange")


def test_diagnosis_figure_key_resolution() -> None:
  def keys(evidence):
    (ax,) = diagnosis_figure(_history(), [_Finding("x", "info", "s", evidence)]).axes
    return [ln.get_label() for ln in ax.get_lines() if ln not in _vlines(ax)]

  # A metric prefix without layers: every scalar key under it (not the histogram).
  assert keys({"metric": "grads/norm"}) == ["grads/norm/a", "grads/norm/b"]
  assert keys({"metrics": ["updates/ratio", "loss"]}) == ["updates/ratio/a", "loss"]
  # Nothing scalar recorded under the evidence (absent, or histograms): the loss.
  for metric in ("nope", "grads/histogram_counts"):
    (ax,) = diagnosis_figure(_history(), [_Finding("x", "info", "s", {"metric": metric})]).axes
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), LOSS[STEPS != 7])
    assert ax.get_ylabel() == "loss"


def test_diagnosis_figure_limits() -> None:
  many = {f"m/{i:02d}": float(i + 1) for i in range(15)}
  h = History([(s, {"loss": 1.0, **many}) for s in range(3)])
  steps = list(range(30))
  (ax,) = diagnosis_figure(h, [_Finding("x", "info", "s", {"metric": "m", "steps": steps})]).axes
  lines = [ln for ln in ax.get_lines() if ln not in _vlines(ax)]
  assert len(lines) == 12  # at most twelve series
  assert len(_vlines(ax)) == 20  # at most twenty steps
  assert to_rgba(_vlines(ax)[0].get_color(), 1) == to_rgba("tab:blue")


def test_diagnosis_figure_layout(tmp_path: Path) -> None:
  findings = [_Finding(f"f{i}", "warning", f"summary {i}", {"metric": "loss"}) for i in range(3)]
  fig = diagnosis_figure(_history(), findings)
  assert len(fig.axes) == 4  # two columns, two rows; the fourth hidden
  assert [ax.get_visible() for ax in fig.axes] == [True, True, True, False]
  assert [ax.get_title(loc="left") for ax in fig.axes[:3]] == [
    f"[warning] f{i}\nsummary {i}" for i in range(3)
  ]
  nine = [_Finding(f"f{i}", "info", "s", {}) for i in range(9)]
  fig = diagnosis_figure(_history(), nine)
  assert len(fig.axes) == 8  # at most eight panels
  assert fig.axes[-1].get_title(loc="left").startswith("[info] f7")
  # From a run directory: the suptitle names it.
  with Recorder(tmp_path / "run") as rec:
    for s in range(3):
      rec.write(s, {"loss": 1.0 / (s + 1)})
  fig = diagnosis_figure(tmp_path / "run", [])
  assert fig.get_suptitle() == f"diagnosis of {tmp_path / 'run'}"
