"""Rule on the learning rate against the curvature: ``lr · λ_max`` above the stability limit
of the run's optimizer (gradient descent on a quadratic is stable only for
``lr · λ_max < 2``).

It reads ``hess_max_ev``, ``lr`` (else ``config["lr"]``) and the optimizer from the run's
config; :func:`_optimizer_limit` is the one place that maps an optimizer to its limit.

Readings whose error bar says they are noise are ignored (issue 18's key contract): with
``hess_max_ev_residual`` (the convergence residual ``‖Hv − λv‖``, within which an eigenvalue
lies) when ``residual ≥ |λ_max|/2``, with ``hess_max_ev_stderr`` when ``2 · stderr ≥
|λ_max|``, i.e. in both cases when ``2 · e ≥ |λ_max|`` for an error bar ``e > 0``
(:func:`_within_noise`). A reading without an error bar (an older run) counts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxscope.diagnose.finding import Finding, Thresholds, _confidence, _finding, _fmt, _margin
from jaxscope.diagnose.series import _finite, _series
from jaxscope.record import History
from jaxscope.transforms.aliases import optimizer_hparams

_ADAPTIVE_HINT = re.compile(r"adam|rms|ada|lion|lamb|lars|sm3|yogi|novograd|fromage|sophia|shampoo")

#: The error bars of a reading ``K``, looked for in this order: ``(suffix, rule)``. Both
#: are noise when ``2 · e ≥ |K|``: a standard error's 2σ band, or a residual of half the value.
_ERROR_BARS = (
  ("_stderr", "2 · stderr ≥ |λ_max|"),
  ("_residual", "residual ≥ |λ_max|/2"),
)


def _optimizer_limit(optimizer: str, optimizer_args: Any, limit: float) -> float | None:
  """The stable ``lr · λ_max`` bound for an optimizer; ``None`` for adaptive ones.

  Args:
    optimizer: the optimizer's name (case-insensitive), e.g. ``"sgd"``, ``"momentum"``,
      ``"nesterov"``, ``"adam"``.
    optimizer_args: its keyword arguments (``momentum``, ``nesterov``); anything but a
      mapping counts as none.
    limit: the bound of plain gradient descent (``Thresholds.curvature_limit``, 2).

  Returns:
    ``limit`` for plain SGD, ``limit · (1 + β)`` for heavy-ball momentum β,
    ``limit · (1 + β)/(1 + 2β)`` for Nesterov momentum (β and Nesterov from the arguments
    with the defaults of :data:`jaxscope.transforms.aliases.OPTIMIZER_DEFAULTS` filled in,
    e.g. β = 0.9 for ``"momentum"``), ``None`` for an
    adaptive optimizer (Adam, RMSProp, …) and ``limit`` for any other name.
  """
  opt = optimizer.lower()
  args = optimizer_hparams(opt, optimizer_args if isinstance(optimizer_args, Mapping) else None)
  beta = args.get("momentum")
  nesterov = bool(args.get("nesterov"))
  if opt not in ("sgd", "momentum", "nesterov"):
    return None if _ADAPTIVE_HINT.search(opt) else limit
  beta = float(beta or 0.0)
  if nesterov:
    return limit * (1 + beta) / (1 + 2 * beta)
  return limit * (1 + beta)


def _curvature_limit(config: Mapping[str, Any], th: Thresholds) -> float | None:
  """The stable ``lr · λ_max`` bound for the run's optimizer; ``None`` for adaptive ones."""
  args = config.get("optimizer_hparams")  # recorded by the loop, defaults filled in
  if not isinstance(args, Mapping):
    args = config.get("optimizer_args")
  return _optimizer_limit(str(config.get("optimizer", "sgd")), args, th.curvature_limit)


def _within_noise(
  h: History, key: str, steps: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, str, str]:
  """Which readings of ``key`` at ``steps`` are within noise by their error bar.

  Args:
    h: the run.
    key: the reading's key (``"hess_max_ev"``).
    steps: the steps of the finite readings.
    values: the readings there.

  Returns:
    ``(mask, error key, rule)``: ``mask[i]`` when the error bar ``e`` of ``{key}_stderr``
    (else ``{key}_residual``) at ``steps[i]`` is finite, ``> 0`` and ``2 · e ≥ |value|``
    (an error bar of 0 is an exact reading); all ``False``, ``""`` and ``""`` without an
    error bar key. Steps where the error bar was not recorded count as measured.
  """
  for suffix, rule in _ERROR_BARS:
    found = _series(h, key + suffix)
    if found is None:
      continue
    e_steps, e = found
    idx = np.clip(np.searchsorted(e_steps, steps), 0, e_steps.size - 1)
    err = np.where(e_steps[idx] == steps, e[idx], np.nan)
    ok = np.isfinite(err) & (err > 0)
    return ok & (2.0 * np.where(ok, err, 0.0) >= np.abs(values)), key + suffix, rule
  return np.zeros(steps.shape, bool), "", ""


def _not_judged(steps: np.ndarray, error_key: str, rule: str, limit: float) -> Finding:
  """The note of a run whose every ``hess_max_ev`` reading is within noise."""
  summary = (
    f"The curvature could not be judged: all {steps.size} λ_max readings are within "
    f"their error bar ({error_key}: {rule}), so lr · λ_max was not compared with the "
    f"limit {_fmt(limit)}."
  )
  return _finding(
    "curvature_not_judged",
    "info",
    summary,
    confidence="high",  # A fact about the readings, not a judgement of them.
    metric=["hess_max_ev"],
    steps=steps,
    values={
      "measured": int(steps.size),
      "ignored_noise": int(steps.size),
      "limit": limit,
      "error_key": error_key,
      "noise_rule": rule,
    },
  )


def _lr_at(
  h: History, e_steps: np.ndarray, lam: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """``(steps, λ_max, lr)`` at the measured steps: the ``lr`` key at the same or the last
  earlier step (steps before the first ``lr`` are dropped), else ``config["lr"]`` (or
  ``config["learning_rate"]``); ``None`` without a learning rate."""
  lr_series = _series(h, "lr")
  if lr_series is not None:
    l_steps, lrs = lr_series
    idx = np.searchsorted(l_steps, e_steps, side="right") - 1
    keep = idx >= 0
    return e_steps[keep], lam[keep], lrs[idx[keep]]
  base = h.config.get("lr", h.config.get("learning_rate"))
  if not isinstance(base, int | float) or isinstance(base, bool):
    return None
  return e_steps, lam, np.full(lam.shape, float(base))


def _falling(steps: np.ndarray, loss: np.ndarray) -> bool:
  """Whether the loss's last quarter lies below its second quarter (medians), all finite."""
  n = loss.size
  if n < 8 or not np.all(np.isfinite(loss)):
    return False
  q = n // 4
  return float(np.median(loss[-q:])) < float(np.median(loss[q : 2 * q]))


def _edge_of_stability(
  h: History, steps: np.ndarray, product: np.ndarray, limit: float, th: Thresholds, frac: float
) -> Finding | None:
  """The info ``edge_of_stability`` when ``lr · λ_max`` hovers at the limit (median of the
  over-limit steps ≤ ``eos_band · limit``) and the loss keeps falling; else ``None``."""
  loss = _series(h, "loss")
  if loss is None or float(np.median(product)) > th.eos_band * limit:
    return None
  if not _falling(*loss):
    return None
  med = float(np.median(product))
  summary = (
    f"lr · λ_max is at the stability limit ({_fmt(limit)}; median {_fmt(med)} on the "
    f"{steps.size} steps above it) while the loss keeps falling: the edge of stability of "
    "gradient descent (Cohen et al. 2021), which is healthy."
  )
  return _finding(
    "edge_of_stability",
    "info",
    summary,
    metric=["lr", "hess_max_ev"],
    steps=steps,
    values={"limit": limit, "median_product": med, "eos_band": th.eos_band},
    confidence=_confidence(
      _margin(frac, th.curvature_fraction, above=True), steps.size, th.curvature_min_points
    ),
  )


def _rule_lr_curvature(h: History, th: Thresholds) -> list[Finding]:
  """Learning rate above the curvature limit.

  With ``hess_max_ev`` (largest Hessian eigenvalue ``λ_max``) and the learning rate (key
  ``lr`` at the same or the last earlier step, else ``config["lr"]``): the product
  ``lr · λ_max`` exceeds the stability limit on more than ``curvature_fraction`` of the
  measured steps (at least ``curvature_min_points`` trusted readings). Confidence: the
  smaller of the two margins, the fraction over ``curvature_fraction`` and the median
  product over the limit. The limit is ``curvature_limit`` (2: gradient descent on a quadratic
  diverges along the top eigenvector when ``lr > 2/λ_max``), ``2(1 + β)`` for heavy-ball
  momentum β and ``2(1 + β)/(1 + 2β)`` for Nesterov momentum (``config["optimizer"]`` and
  ``config["optimizer_args"]``, β = 0.9 for ``"momentum"``/``"nesterov"``); the rule is
  skipped for adaptive optimizers (Adam, RMSProp, …), whose effective step differs.

  Readings within noise by their error bar (``hess_max_ev_residual ≥ |λ_max|/2`` or
  ``2 · hess_max_ev_stderr ≥ |λ_max|``) are ignored: they are neither measured steps nor
  over the limit, and the evidence counts them (``values["ignored_noise"]`` of
  ``values["measured"]``, with ``values["noise_rule"]``). When every reading is noise the
  rule does not fire; it returns the info ``curvature_not_judged`` instead.
  Edge of stability: when the median product over the steps above the limit is within
  ``eos_band ×`` the limit and the loss keeps falling (:func:`_edge_of_stability`), the
  run sits where gradient descent settles by itself (Cohen et al. 2021): the info
  ``edge_of_stability``, not a warning.

  Warning. Source: the classical quadratic stability bound; Cockpit's ``hess_max_ev``.
  """
  ev = _series(h, "hess_max_ev")
  if ev is None:
    return []
  limit = _curvature_limit(h.config, th)
  if limit is None:
    return []
  e_steps, lam = _finite(*ev)
  if e_steps.size == 0 or _lr_at(h, e_steps, lam) is None:
    return []
  noise, error_key, rule = _within_noise(h, "hess_max_ev", e_steps, lam)
  if noise.all():
    return [_not_judged(e_steps, error_key, rule, limit)]
  measured, ignored = int(e_steps.size), int(noise.sum())
  at = _lr_at(h, e_steps[~noise], lam[~noise])
  if at is None:
    return []
  e_steps, lam, lr = at
  if e_steps.size < max(th.curvature_min_points, 1):
    return []
  product = lr * lam
  over = product > limit
  frac = float(over.mean())
  if frac <= th.curvature_fraction:
    return []
  eos = _edge_of_stability(h, e_steps[over], product[over], limit, th, frac)
  if eos is not None:
    return [eos]
  margin = min(
    _margin(frac, th.curvature_fraction, above=True),
    _margin(float(np.median(product[over])), limit, above=True),
  )
  worst = int(np.argmax(product))
  summary = (
    f"The learning rate is above the curvature limit: lr · λ_max > {_fmt(limit)} on "
    f"{frac:.0%} of the {e_steps.size} measured steps (largest {_fmt(product[worst])} at "
    f"step {int(e_steps[worst])}, i.e. lr {_fmt(lr[worst])} vs 2/λ_max "
    f"{_fmt(2 / lam[worst])})."
  )
  values: dict[str, Any] = {
    "limit": limit,
    "fraction": frac,
    "max_product": float(product[worst]),
    "max_step": int(e_steps[worst]),
    "measured": measured,
    "ignored_noise": ignored,
  }
  if ignored:
    summary += (
      f" {ignored} of the {measured} λ_max readings were ignored as noise ({error_key}: {rule})."
    )
    values.update({"error_key": error_key, "noise_rule": rule})
  return [
    _finding(
      "lr_above_curvature_limit",
      "warning",
      summary,
      metric=["lr", "hess_max_ev"],
      steps=e_steps[over],
      values=values,
      confidence=_confidence(margin, e_steps.size, th.curvature_min_points),
    )
  ]
