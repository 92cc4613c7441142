"""Layer robustness: re-initialisation and re-randomisation (Zhang, Bengio & Singer 2019).

For layers ``d = 1 … D`` and checkpoints ``θ^τ`` (``τ = 0`` the initialisation, ``T`` the
trained model), the *re-initialisation* test evaluates the trained network with one
layer reset to an earlier checkpoint,

    err_d(τ) = err(θ_1^T, …, θ_d^τ, …, θ_D^T),

a heat-map over checkpoints × layers; *re-randomisation* resets the layer to a fresh draw
from its initialisation distribution instead (averaged over seeds; far more destructive in
the paper). All points of both tests run through the one compiled kernel of
:mod:`jaxscope.analysis.kernel` (basis = the checkpoints and the fresh draws, one
coefficient group per layer).

**Classification** (Zhang et al. read it off the heat-maps; the thresholds here are
explicit and adjustable), from the re-initialisation to ``τ = 0``:

* **ambient** if ``err_d(0) − err(θ^T) ≤ ambient_tol`` (default 0.01, one point of error):
  resetting the layer to its initial values changes almost nothing;
* **critical** if ``err_d(0) ≥ chance_error − critical_tol`` (default 0.10, with
  ``chance_error = 1 − 1/classes``): resetting it destroys the network;
* **intermediate** otherwise.

Terminology: arXiv v3 of the paper says *ambient* vs *critical*; other versions say
*robust* vs *critical* (robust ≡ ambient). The nnvis thesis used "robust" the other way
round, for layers with a *big* impact, i.e. for what is called **critical** here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxscope import tree as jtree
from jaxscope.analysis.kernel import ApplyFn, EvalSet, make_point_evaluator

__all__ = ["RobustnessResult", "classify_layers", "layer_robustness"]


class RobustnessResult(NamedTuple):
  """The re-initialisation heat-map, re-randomisation and the layer classes."""

  layers: tuple[str, ...]
  steps: tuple[int, ...]
  """The checkpoint steps ``τ`` (rows of the heat-map)."""
  error: np.ndarray
  """``[len(steps), len(layers)]``: test error with the layer reset to ``θ^τ``."""
  loss: np.ndarray
  """``[len(steps), len(layers)]``: test loss of the same."""
  base_error: float
  """Test error of the trained model ``θ^T`` (the last checkpoint)."""
  rerandomized_error: np.ndarray
  """``[seeds, len(layers)]``: test error with the layer re-drawn (empty without
  ``init_fn``)."""
  labels: dict[str, str]
  """``ambient`` / ``intermediate`` / ``critical`` per layer."""
  thresholds: dict[str, float]
  """``ambient_tol``, ``critical_tol``, ``chance_error``."""


def classify_layers(
  reinit_error: np.ndarray,
  base_error: float,
  layers: Sequence[str],
  *,
  chance_error: float,
  ambient_tol: float = 0.01,
  critical_tol: float = 0.10,
) -> dict[str, str]:
  """Labels each layer from its re-initialisation-to-``τ = 0`` error (module docstring).

  A non-finite error (a reset that produces NaN) counts as critical.
  """
  out = {}
  for name, e in zip(layers, np.asarray(reinit_error, np.float64), strict=True):
    if not np.isfinite(e) or e >= chance_error - critical_tol:
      out[name] = "critical"
    elif e - base_error <= ambient_tol:
      out[name] = "ambient"
    else:
      out[name] = "intermediate"
  return out


def layer_robustness(
  apply_fn: ApplyFn,
  eval_set: EvalSet,
  checkpoints: Sequence[Any],
  steps: Sequence[int] | None = None,
  *,
  num_classes: int,
  init_fn: Callable[[jax.Array], Any] | None = None,
  seeds: int = 3,
  depth: int | None = -1,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  ambient_tol: float = 0.01,
  critical_tol: float = 0.10,
  model_state: Any = None,
) -> RobustnessResult:
  """Re-initialisation heat-map, re-randomisation and classification of every layer.

  Args:
    apply_fn: ``apply_fn(params, model_state, x) -> logits`` in evaluation mode.
    eval_set: the test set (:func:`jaxscope.analysis.make_eval_set`).
    checkpoints: parameter trees in training order; the first is ``τ = 0`` (the
      initialisation), the last the trained model ``θ^T``.
    steps: their training steps (default ``0, 1, …``).
    num_classes: to compute the chance error ``1 − 1/num_classes``.
    init_fn: ``init_fn(key) -> params`` drawing a fresh initialisation (e.g.
      ``lambda k: model.init(k, x)["params"]``); ``None`` skips re-randomisation.
    seeds: fresh draws for re-randomisation (keys ``1 … seeds``).
    depth, include, exclude: the layer grouping (:func:`jaxscope.tree.layout`; default
      per module, a kernel with its bias).
    ambient_tol, critical_tol: the classification thresholds.
    model_state: BatchNorm statistics used throughout (the trained model's).

  Raises:
    ValueError: fewer than two checkpoints, ``steps`` of the wrong length.
  """
  cps = list(checkpoints)
  if len(cps) < 2:
    raise ValueError("layer_robustness: give at least the initial and the final checkpoint.")
  steps = tuple(int(s) for s in (steps if steps is not None else range(len(cps))))
  if len(steps) != len(cps):
    raise ValueError(f"layer_robustness: {len(steps)} steps for {len(cps)} checkpoints.")
  final = cps[-1]
  lay = jtree.layout(final, include=include, exclude=exclude, depth=depth, argname="checkpoint")
  layers = tuple(lay.keys)
  L, T = len(layers), len(cps)
  leaf_group = [L] * len(lay.leaves)
  for gi, g in enumerate(lay.groups):
    for info in g.leaves:
      leaf_group[info.index] = gi
  fresh = [init_fn(jax.random.key(s)) for s in range(1, seeds + 1)] if init_fn else []
  basis = cps + fresh
  r, G = len(basis), L + 1
  rest = np.zeros(r)
  rest[T - 1] = 1.0
  coeffs = []
  for source in list(range(T)) + list(range(T, r)):  # checkpoints, then fresh draws
    for li in range(L):
      c = np.repeat(rest[:, None], G, axis=1)
      c[:, li] = 0.0
      c[source, li] = 1.0
      coeffs.append(c)
  ev = make_point_evaluator(
    apply_fn,
    basis,
    eval_set,
    groups=[*layers, "(rest)"],
    leaf_groups=leaf_group,
    model_state=model_state,
  )
  out = ev.evaluate(np.stack(coeffs))
  err = 1.0 - out["accuracy"]
  loss = out["loss"]
  heat = err[: T * L].reshape(T, L)
  heat_loss = loss[: T * L].reshape(T, L)
  rerand = err[T * L :].reshape(len(fresh), L) if fresh else np.zeros((0, L))
  base = float(heat[T - 1].mean())  # every layer reset to θ^T is θ^T itself
  chance = 1.0 - 1.0 / num_classes
  labels = classify_layers(
    heat[0], base, layers, chance_error=chance, ambient_tol=ambient_tol, critical_tol=critical_tol
  )
  return RobustnessResult(
    layers,
    steps,
    heat,
    heat_loss,
    base,
    rerand,
    labels,
    {"ambient_tol": ambient_tol, "critical_tol": critical_tol, "chance_error": chance},
  )
