"""Rule on the learning rate against the curvature: ``lr · λ_max`` above the stability limit
of the run's optimizer (gradient descent on a quadratic is stable only for
``lr · λ_max < 2``).

It reads ``hess_max_ev``, ``lr`` (else ``config["lr"]``) and the optimizer from the run's
config; :func:`_optimizer_limit` is the one place that maps an optimizer to its limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxscope.diagnose.finding import Finding, Thresholds, _finding, _fmt
from jaxscope.diagnose.series import _finite, _series
from jaxscope.record import History
from jaxscope.transforms.aliases import optimizer_hparams

_ADAPTIVE_HINT = re.compile(r"adam|rms|ada|lion|lamb|lars|sm3|yogi|novograd|fromage|sophia|shampoo")

#: The momentum assumed for ``"momentum"`` / ``"nesterov"`` without ``optimizer_args["momentum"]``.


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


def _rule_lr_curvature(h: History, th: Thresholds) -> list[Finding]:
  """Learning rate above the curvature limit.

  With ``hess_max_ev`` (largest Hessian eigenvalue ``λ_max``) and the learning rate (key
  ``lr`` at the same or the last earlier step, else ``config["lr"]``): the product
  ``lr · λ_max`` exceeds the stability limit on more than ``curvature_fraction`` of the
  measured steps. The limit is ``curvature_limit`` (2: gradient descent on a quadratic
  diverges along the top eigenvector when ``lr > 2/λ_max``), ``2(1 + β)`` for heavy-ball
  momentum β and ``2(1 + β)/(1 + 2β)`` for Nesterov momentum (``config["optimizer"]`` and
  ``config["optimizer_args"]``, β = 0.9 for ``"momentum"``/``"nesterov"``); the rule is
  skipped for adaptive optimizers (Adam, RMSProp, …), whose effective step differs.
  Warning. Source: the classical quadratic stability bound; Cockpit's ``hess_max_ev``.
  """
  ev = _series(h, "hess_max_ev")
  if ev is None:
    return []
  limit = _curvature_limit(h.config, th)
  if limit is None:
    return []
  e_steps, lam = _finite(*ev)
  if e_steps.size == 0:
    return []
  at = _lr_at(h, e_steps, lam)
  if at is None:
    return []
  e_steps, lam, lr = at
  if e_steps.size == 0:
    return []
  product = lr * lam
  over = product > limit
  frac = float(over.mean())
  if frac <= th.curvature_fraction:
    return []
  worst = int(np.argmax(product))
  summary = (
    f"The learning rate is above the curvature limit: lr · λ_max > {_fmt(limit)} on "
    f"{frac:.0%} of the {e_steps.size} measured steps (largest {_fmt(product[worst])} at "
    f"step {int(e_steps[worst])}, i.e. lr {_fmt(lr[worst])} vs 2/λ_max "
    f"{_fmt(2 / lam[worst])})."
  )
  return [
    _finding(
      "lr_above_curvature_limit",
      "warning",
      summary,
      metric=["lr", "hess_max_ev"],
      steps=e_steps[over],
      values={
        "limit": limit,
        "fraction": frac,
        "max_product": float(product[worst]),
        "max_step": int(e_steps[worst]),
      },
    )
  ]
