"""Optimizers known by a name that is not an optax alias, and their default arguments.

``"momentum"`` is SGD with heavy-ball momentum (β = 0.9 unless given) and ``"nesterov"``
its Nesterov form (Sutskever et al. 2013). :data:`OPTIMIZER_DEFAULTS` is the one place
these defaults are written: the reference loop builds the optimizers from it, the run's
``config.json`` records the arguments with them filled in (``optimizer_hparams``), and the
diagnoses read the momentum of a run from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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


def _sgd_signature(fn: Callable[..., Any], defaults: Mapping[str, Any]) -> None:
  """Gives ``fn`` (which passes its keyword arguments to ``optax.sgd``) the signature of
  ``optax.sgd`` with ``defaults``, so ``inspect.signature`` (``help``, the argument checks
  of :func:`jaxscope.train.make_optimizer`) shows what it takes."""
  sig = inspect.signature(optax.sgd)
  params = [p.replace(default=defaults.get(p.name, p.default)) for p in sig.parameters.values()]
  fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]


_sgd_signature(momentum, OPTIMIZER_DEFAULTS["momentum"])
_sgd_signature(nesterov, OPTIMIZER_DEFAULTS["nesterov"])
