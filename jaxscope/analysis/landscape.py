"""1-D and 2-D loss landscapes around a point, and the trajectory on a plane.

``f(a) = L(θ* + a·δ)`` and ``f(a, b) = L(θ* + a·δ + b·η)`` (Li, Xu, Taylor, Studer &
Goldstein, "Visualizing the loss landscape of neural nets", NeurIPS 2018), evaluated on
the one compiled kernel of :mod:`jaxscope.analysis.kernel` with the basis
``[θ*, δ, η]`` and coefficients ``[1, a, b]``. Directions come from
:mod:`jaxscope.analysis.directions` (filter-normalised random directions, or PCA of the
trajectory).

Grids are stored as ``loss[iy, ix]`` (rows are ``y``) with explicit ``x`` and ``y``
vectors, so non-square grids keep their orientation (the original code scrambled them).
Results save to a self-describing ``.npz`` (arrays) + ``.json`` (settings, evaluation-set
hash, timings) pair, written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxscope.analysis.kernel import ApplyFn, EvalSet, make_point_evaluator
from jaxscope.record import read_json, write_atomic, write_json

#: The original's default axis: 51 points on [−1, 1] (contains 0).
DEFAULT_AXIS = np.linspace(-1.0, 1.0, 51)

__all__ = [
  "DEFAULT_AXIS",
  "Landscape",
  "landscape_1d",
  "landscape_2d",
  "load_landscape",
  "save_landscape",
]


class Landscape(NamedTuple):
  """Loss and accuracy on a line or a grid around ``θ*``."""

  x: np.ndarray
  y: np.ndarray | None
  """``None`` for a 1-D landscape."""
  loss: np.ndarray
  """``[nx]`` (1-D) or ``[ny, nx]`` (2-D, rows are ``y``)."""
  accuracy: np.ndarray
  center_loss: float
  """``L(θ*)`` evaluated on its own (the grid's centre must reproduce it)."""
  settings: dict[str, Any]
  """What produced it: directions, normalisation, seed, evaluation-set hash, timings."""


def _grid(values: Any, name: str) -> np.ndarray:
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0 or not np.all(np.isfinite(v)):
    raise ValueError(f"{name} must be a non-empty array of finite coordinates, got {values!r}.")
  return v


def _info(
  settings: dict[str, Any] | None, eval_set: EvalSet, points: int, timings: dict[str, float]
) -> dict[str, Any]:
  """The caller's settings plus, under their own keys, what the kernel measured."""
  return {
    **(settings or {}),
    "eval_set_digest": eval_set.digest,
    "grid_points": points,
    "timings": dict(timings),
  }


def landscape_1d(
  apply_fn: ApplyFn,
  eval_set: EvalSet,
  center: Any,
  direction: Any,
  xs: Any = DEFAULT_AXIS,
  *,
  model_state: Any = None,
  task: str = "classification",
  settings: dict[str, Any] | None = None,
) -> Landscape:
  """``f(a) = L(θ* + a·δ)`` for ``a`` in ``xs`` (default 51 points on ``[−1, 1]``, the
  original's default, which contains ``a = 0``)."""
  xs = _grid(xs, "xs")
  ev = make_point_evaluator(
    apply_fn, [center, direction], eval_set, model_state=model_state, task=task
  )
  # The centre rides along as one more point (one compiled shape, no second compile).
  coeffs = np.stack([np.ones(len(xs) + 1), np.append(xs, 0.0)], axis=1)
  out = ev.evaluate(coeffs)
  info = _info(settings, eval_set, len(xs), ev.timings)
  return Landscape(xs, None, out["loss"][:-1], out["accuracy"][:-1], float(out["loss"][-1]), info)


def landscape_2d(
  apply_fn: ApplyFn,
  eval_set: EvalSet,
  center: Any,
  dir_x: Any,
  dir_y: Any,
  xs: Any = DEFAULT_AXIS,
  ys: Any = DEFAULT_AXIS,
  *,
  model_state: Any = None,
  task: str = "classification",
  settings: dict[str, Any] | None = None,
) -> Landscape:
  """``f(a, b) = L(θ* + a·δ + b·η)`` on the grid ``xs × ys``, stored as ``[len(ys),
  len(xs)]`` (rows are ``y``)."""
  xs, ys = _grid(xs, "xs"), _grid(ys, "ys")
  ev = make_point_evaluator(
    apply_fn, [center, dir_x, dir_y], eval_set, model_state=model_state, task=task
  )
  a, b = np.meshgrid(xs, ys)  # [ny, nx] each, rows are y
  coeffs = np.stack([np.ones(a.size + 1), np.append(a.ravel(), 0.0), np.append(b.ravel(), 0.0)], 1)
  out = ev.evaluate(coeffs)
  info = _info(settings, eval_set, int(a.size), ev.timings)
  shape = (len(ys), len(xs))
  return Landscape(
    xs,
    ys,
    out["loss"][:-1].reshape(shape),
    out["accuracy"][:-1].reshape(shape),
    float(out["loss"][-1]),
    info,
  )


def save_landscape(path: str | Path, landscape: Landscape, **arrays: Any) -> tuple[Path, Path]:
  """Writes ``path.npz`` (``x``, ``y``, ``loss``, ``accuracy`` and any extra ``arrays``,
  e.g. trajectory coordinates) and ``path.json`` (settings, centre loss), each atomically
  (a temporary file, then ``os.replace``). Returns both paths."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  npz, js = path.with_suffix(".npz"), path.with_suffix(".json")
  data = {"x": landscape.x, "loss": landscape.loss, "accuracy": landscape.accuracy}
  if landscape.y is not None:
    data["y"] = landscape.y
  data.update({k: np.asarray(v) for k, v in arrays.items()})
  meta = {
    "center_loss": landscape.center_loss,
    "dims": 1 if landscape.y is None else 2,
    "layout": "loss[iy, ix]" if landscape.y is not None else "loss[ix]",
    "settings": landscape.settings,
    "arrays": sorted(data),
  }
  write_atomic(npz, lambda f: np.savez(f, **data))
  write_json(js, meta)
  return npz, js


def load_landscape(path: str | Path) -> tuple[Landscape, dict[str, np.ndarray]]:
  """Reads what :func:`save_landscape` wrote; returns the landscape and the extra arrays."""
  path = Path(path)
  with np.load(path.with_suffix(".npz")) as z:
    arrays = {k: z[k] for k in z.files}
  meta = read_json(path.with_suffix(".json"))
  extra = {k: v for k, v in arrays.items() if k not in ("x", "y", "loss", "accuracy")}
  land = Landscape(
    arrays["x"],
    arrays.get("y"),
    arrays["loss"],
    arrays["accuracy"],
    float(meta["center_loss"]),
    meta["settings"],
  )
  return land, extra
