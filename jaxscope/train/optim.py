"""Optimizers and learning-rate schedules of the reference loop, by name.

:func:`make_optimizer` and :func:`make_schedule` turn the command-line spellings into optax
objects; :func:`build_optimizer` assembles a run's whole optimizer from its
:class:`~jaxscope.run.TrainConfig` (schedule or ratio-adaptive rate, preconditioner
phases, capacity freezing, the monitored scope).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from jaxscope import transforms
from jaxscope.metrics.scope import Scope
from jaxscope.models.keywords import keyword_parameters, unknown_keywords, wrong_kind
from jaxscope.run.config import TrainConfig
from jaxscope.transforms import aliases

__all__ = [
  "HVP_OPTIMIZERS",
  "OPTIMIZERS",
  "Optimizer",
  "build_optimizer",
  "make_optimizer",
  "make_schedule",
  "updates_in_span",
]


#: Optimizers known by a name that is not an optax alias (any optax alias name works too).
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "momentum": aliases.momentum,
  "nesterov": aliases.nesterov,
}


#: Optimizers that need Hessian-vector products (``update(..., hvp_fn=)``); they estimate
#: their own learning rate, so ``learning_rate`` is not passed (use ``initial_lr=`` or
#: ``fixed_lr=`` keyword arguments).
HVP_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
  "preconditioned_sgd": transforms.preconditioned_sgd,
  "adaptive_sgd": transforms.adaptive_sgd,
  "only_adaptive_sgd": transforms.only_adaptive_sgd,
}


def make_optimizer(
  name: str, learning_rate: optax.ScalarOrSchedule, /, **kwargs: Any
) -> optax.GradientTransformation:
  """Builds an optimizer by name: ``OPTIMIZERS`` first, then any optax alias.

  ``"momentum"`` is SGD with heavy-ball momentum 0.9 and ``"nesterov"`` its Nesterov
  form; every other name is looked up in ``optax`` (``sgd``, ``adam``, ``adamw``,
  ``rmsprop``, ``lion``, …) and called as ``optax.<name>(learning_rate, **kwargs)``.
  The probabilistic preconditioners of :data:`HVP_OPTIMIZERS` (``preconditioned_sgd``,
  ``adaptive_sgd``, ``only_adaptive_sgd``) estimate their step size; ``learning_rate``
  is ignored for them (pass ``initial_lr=``/``fixed_lr=``) and their ``update`` needs
  ``hvp_fn=`` (:func:`make_train_step` with ``hvp=True``).

  ``kwargs`` are checked against the optimizer's signature first: a name it does not
  take, or a text where it takes a number or a bool (``weight_decay="abc"``), is refused
  with the names it takes.

  Raises:
    ValueError: unknown name, or a name that is not an optimizer alias; or keyword
      arguments the optimizer does not take or of the wrong kind (named in the message).
  """
  factory = _factory(name)
  _check_optimizer_args(name, factory, kwargs)
  try:
    tx = factory(**kwargs) if name in HVP_OPTIMIZERS else factory(learning_rate, **kwargs)
  except TypeError as e:
    raise ValueError(f"optimizer {name!r} rejected its arguments {kwargs}: {e}") from e
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"optimizer {name!r} did not return an optax GradientTransformation.")
  return tx


#: The optimizers whose updates are ``c₀·g + c₁·d_{t−1}`` (see :func:`updates_in_span`).
SPAN_OPTIMIZERS = ("sgd", "momentum")


def updates_in_span(config: TrainConfig, *, capacity: bool = False) -> bool:
  """Whether a run's updates lie in the span of its gradient and its last update.

  Plain SGD (``−η_t g``) and heavy-ball momentum (``−η_t g + μ·(η_t/η_{t−1})·d_{t−1}``)
  do, under every schedule, ``schedule="ratio"`` included (it scales the update); not
  Nesterov momentum (``nesterov=True``), the other optimizers, nor a growing network's
  frozen chunks (:func:`build_optimizer` with ``capacity``). The instruments' α then
  combines the update's per-example projections from the others' (``updates_in_span``
  of :func:`jaxscope.metrics.instruments`).
  """
  nesterov = bool(config.optimizer_args.get("nesterov", False))
  return config.optimizer in SPAN_OPTIMIZERS and not nesterov and not capacity


def _factory(name: str) -> Callable[..., optax.GradientTransformation]:
  """The optimizer called ``name`` (:func:`make_optimizer`)."""
  factory = HVP_OPTIMIZERS.get(name) or OPTIMIZERS.get(name)
  if factory is not None:
    return factory
  factory = getattr(optax, name, None)
  if factory is None or not callable(factory) or name.startswith("_"):
    known = sorted([*OPTIMIZERS, *HVP_OPTIMIZERS])
    raise ValueError(
      f"unknown optimizer {name!r}: expected one of {known} or an optax alias such as sgd, "
      "adam, adamw, rmsprop, lion."
    )
  try:
    first = next(iter(inspect.signature(factory).parameters))
  except (TypeError, ValueError, StopIteration):
    first = None
  if first != "learning_rate":
    raise ValueError(
      f"optax.{name} is not an optimizer alias (its first argument is {first!r}, "
      "not learning_rate)."
    )
  return factory


def _check_optimizer_args(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
  """Refuses keyword arguments ``factory`` does not take, or texts where it takes a number
  or a bool, naming the argument and listing those it takes."""
  hvp = name in HVP_OPTIMIZERS
  found = keyword_parameters(factory, skip=0 if hvp else 1)
  if found is None:
    return
  params, var_keyword = found
  if hvp and var_keyword:  # They pass the rest to probabilistic_preconditioner.
    forwarded = keyword_parameters(transforms.probabilistic_preconditioner)
    params = {**(forwarded[0] if forwarded else {}), **params}
    var_keyword = forwarded is None or forwarded[1]
  rejected = f"optimizer {name!r} rejected its arguments {kwargs}"
  if "learning_rate" in kwargs and "learning_rate" not in params:
    how = "give initial_lr= or fixed_lr=" if hvp else "it is lr (--lr), not an optimizer argument"
    estimates = " (it estimates its step size)" if hvp else ""
    raise ValueError(f"{rejected}: learning_rate{estimates}: {how}.")
  unknown = None if var_keyword else unknown_keywords(kwargs, params)
  if unknown:
    raise ValueError(
      f"{rejected}: unexpected keyword argument(s) {unknown}; {name} takes "
      f"{', '.join(params) or 'none'} (optimizer_args, --opt-args)."
    )
  bad = wrong_kind(params, kwargs)
  if bad:
    key, value, expected = bad
    raise ValueError(f"{rejected}: {key} must be {expected}, got {value!r}.")


def make_schedule(
  spec: str, learning_rate: float, *, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """Builds a learning-rate schedule from its command-line spelling.

  * ``"constant"``: ``η_t = η``.
  * ``"exponential:γ"``: ``η_t = η · γ^⌊t / steps_per_epoch⌋`` (γ per epoch, as
    ikkuna's ``--exponential-decay``; ``"exponential"`` alone means γ = 0.98).
  * ``"cosine"``: ``η_t = η · ½(1 + cos(π t / T))`` over the ``T = total_steps`` steps
    (Loshchilov & Hutter 2017, without restarts).

  Raises:
    ValueError: unknown spec or a γ outside ``(0, 1]``.
  """
  if learning_rate <= 0 or not math.isfinite(learning_rate):
    raise ValueError(f"learning rate (lr) must be a positive finite number, got {learning_rate}.")
  name, _, arg = spec.partition(":")
  if name == "constant" and not arg:
    return optax.constant_schedule(learning_rate)
  if name == "exponential":
    try:
      gamma = float(arg) if arg else 0.98
    except ValueError:
      raise ValueError(f"schedule {spec!r}: γ must be a number, e.g. exponential:0.98.") from None
    if not 0.0 < gamma <= 1.0:
      raise ValueError(f"schedule {spec!r}: γ must be in (0, 1], got {gamma}.")
    return optax.exponential_decay(
      learning_rate, transition_steps=max(1, steps_per_epoch), decay_rate=gamma, staircase=True
    )
  if name == "cosine" and not arg:
    return optax.cosine_decay_schedule(learning_rate, decay_steps=max(1, total_steps))
  raise ValueError(
    f"unknown schedule {spec!r}: expected constant, exponential:γ (e.g. exponential:0.98), "
    "cosine, or (in train) ratio."
  )


class Optimizer(NamedTuple):
  """A run's optimizer as :func:`build_optimizer` assembles it."""

  tx: optax.GradientTransformation
  """The whole transformation (monitored when a scope is given)."""
  schedule: optax.Schedule | None
  """The learning-rate schedule, to record ``lr`` (``None`` when the rate is steered or
  estimated by the transformation itself)."""
  phase_of: Callable[[int], int] | None
  """For the probabilistic preconditioners: the phase of a step (a static argument of the
  step), else ``None``."""


def build_optimizer(
  config: TrainConfig,
  *,
  steps_per_epoch: int,
  total_steps: int,
  scope: Scope | None = None,
  capacity: bool = False,
) -> Optimizer:
  """The optimizer of a run: ``config.optimizer`` with its schedule.

  ``schedule="ratio"`` chains :func:`jaxscope.transforms.ratio_adaptive_lr` after the
  optimizer at the constant ``lr``; the probabilistic preconditioners (:data:`HVP_OPTIMIZERS`)
  estimate their step size and re-estimate it at every epoch start, as the original did
  (``reestimate_every`` = ``steps_per_epoch`` when an epoch holds a whole estimation
  cycle); other optimizers get :func:`make_schedule`. ``capacity`` wraps it in
  :func:`jaxscope.transforms.masked_freeze`, and a ``scope`` in
  :func:`jaxscope.transforms.monitored`.

  Raises:
    ValueError: a preconditioner with a schedule other than ``constant``, or the
      errors of :func:`make_optimizer` and :func:`make_schedule`.
  """
  if config.optimizer in HVP_OPTIMIZERS and config.schedule != "constant":
    raise ValueError(
      f"train: optimizer {config.optimizer!r} estimates its own step size; use "
      f"schedule='constant' (got {config.schedule!r})."
    )
  phase_of: Callable[[int], int] | None = None
  schedule: optax.Schedule | None = None
  if config.schedule == "ratio":
    # The rate is steered by the update/weight ratio; the state reports it (ratio_lr_values).
    tx = optax.chain(
      make_optimizer(config.optimizer, config.lr, **config.optimizer_args),
      transforms.ratio_adaptive_lr(
        config.ratio_target,
        config.ratio_smoothing,
        config.ratio_max_factor,
        config.ratio_floor,
        mode=config.ratio_mode,  # type: ignore[arg-type]
        base_learning_rate=config.lr,
      ),
    )
  elif config.optimizer in HVP_OPTIMIZERS:
    # The step size is estimated (α); the original re-estimated at every epoch start.
    kwargs = dict(config.optimizer_args)
    cycle_p, cycle_m = kwargs.get("prior_iterations", 10), kwargs.get("num_observations", 5)
    if "reestimate_every" not in kwargs:
      kwargs["reestimate_every"] = steps_per_epoch if steps_per_epoch >= cycle_p + cycle_m else None
    tx = make_optimizer(config.optimizer, config.lr, **kwargs)
    phase_of = functools.partial(
      transforms.preconditioner_phase,
      prior_iterations=cycle_p,
      num_observations=cycle_m,
      reestimate_every=kwargs["reestimate_every"],
    )
  else:
    schedule = make_schedule(
      config.schedule, config.lr, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    tx = make_optimizer(config.optimizer, schedule, **config.optimizer_args)
  if capacity:  # Frozen chunks: zero update, optimizer state kept.
    tx = transforms.masked_freeze(tx)
  if scope is not None:
    tx = transforms.monitored(tx, scope)
  return Optimizer(tx, schedule, phase_of)
