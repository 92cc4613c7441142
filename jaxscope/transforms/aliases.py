"""Optimizers known by a name that is not an optax alias, and their default arguments.

``"momentum"`` is SGD with heavy-ball momentum (β = 0.9 unless given) and ``"nesterov"``
its Nesterov form (Sutskever et al. 2013). :data:`OPTIMIZER_DEFAULTS` is the one place
these defaults are written: the reference loop builds the optimizers from it, the run's
``config.json`` records the arguments with them filled in (``optimizer_hparams``), and the
diagnoses read the momentum of a run from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

__all__ = ["OPTIMIZER_DEFAULTS", "momentum", "nesterov", "optimizer_hparams"]

#: Defaults of the optimizers known by a name that is not an optax alias.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
  "momentum": {"momentum": 0.9},
  "nesterov": {"momentum": 0.9, "nesterov": True},
}


def optimizer_hparams(optimizer: str, optimizer_args: Mapping[str, Any] | None) -> dict[str, Any]:
  """The optimizer's keyword arguments with the defaults of :data:`OPTIMIZER_DEFAULTS`
  filled in.

  >>> optimizer_hparams("momentum", {})
  {'momentum': 0.9}
  >>> optimizer_hparams("adam", {"b1": 0.8})
  {'b1': 0.8}
  """
  return {**OPTIMIZER_DEFAULTS.get(optimizer, {}), **dict(optimizer_args or {})}


def momentum(learning_rate: optax.ScalarOrSchedule, **kwargs: Any) -> optax.GradientTransformation:
  """SGD with heavy-ball momentum: ``optax.sgd(learning_rate, momentum=0.9, **kwargs)``."""
  return optax.sgd(learning_rate, **optimizer_hparams("momentum", kwargs))


def nesterov(learning_rate: optax.ScalarOrSchedule, **kwargs: Any) -> optax.GradientTransformation:
  """SGD with Nesterov momentum: ``optax.sgd(learning_rate, momentum=0.9, nesterov=True,
  **kwargs)``."""
  return optax.sgd(learning_rate, **optimizer_hparams("nesterov", kwargs))
