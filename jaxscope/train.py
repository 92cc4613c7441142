"""The reference training loop: a jitted step, evaluation, recorder, checkpoints.

:func:`train` runs a :class:`TrainConfig` end to end and writes a run directory::

    run_dir/config.json       the configuration (and library versions)
    run_dir/metrics.jsonl     per-step values: loss, train/accuracy, lr, the scope's
                              {topic}/{stat}/{layer} metrics, test/loss, test/accuracy;
                              with the presets economy/business/full also Cockpit's
                              instruments (alpha, norm_test, hess_trace, …) and the
                              activation health (activations/std/{layer}, …)
    run_dir/checkpoints/      orbax checkpoints (init, every k steps, final) with metadata
    run_dir/tensorboard/      with ``tensorboard=True``

Steps are counted as optimizer updates: the values recorded at step ``k`` are measured
on the parameters ``θ_k`` *before* the ``k``-th update (the scope's ``params``, the
batch loss), and the evaluation and checkpoint at step ``k`` hold ``θ_k`` as well, so
step 0 is the initialisation and the last step is the trained model.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from
``(seed, e)``, and dropout keys are ``fold_in(key(seed), step)``, so a run is a pure
function of its configuration: the same seed gives the same ``metrics.jsonl`` bit for
bit on the same machine, and a resumed run continues exactly as the uninterrupted one.

The lower-level pieces (:func:`make_optimizer`, :func:`make_schedule`,
:func:`make_scope`, :func:`make_train_step`, :func:`make_evaluate`) are public, for
loops of your own and for the benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscope import capture, transforms
from jaxscope.checkpoint import CHECKPOINT_DIR
from jaxscope.metrics import registry
from jaxscope.metrics.instruments import Instruments, InstrumentsState, instruments
from jaxscope.metrics.network import NetworkMetric
from jaxscope.metrics.scope import MEASURED, PARAM_TOPICS, Scope, scope
from jaxscope.models import growth
from jaxscope.record import Recorder

__all__ = [
  "ACTIVATION_METRICS",
  "CAPACITY_DEFAULTS",
  "HVP_OPTIMIZERS",
  "INSTRUMENT_PRESETS",
  "OPTIMIZERS",
  "TrainConfig",
  "TrainResult",
  "TrainState",
  "init_instruments",
  "make_activation_scope",
  "make_evaluate",
  "make_instruments",
  "make_optimizer",
  "make_schedule",
  "make_scope",
  "make_train_step",
  "parse_capacity",
  "train",
]


# --------------------------------------------------------------------------- optimizers


def _sgd_momentum(learning_rate: optax.ScalarOrSchedule, **kw: Any) -> optax.GradientTransformation:
  kw.setdefault("momentum", 0.9)
  return optax.sgd(learning_rate, **kw)


def _nesterov(learning_rate: optax.ScalarOrSchedule, **kw: Any) -> optax.GradientTransformation:
  kw.setdefault("momentum", 0.9)
  return optax.sgd(learning_rate, nesterov=True, **kw)


#: Optimizers known by a name that is not an optax alias (any optax alias name works too).
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "momentum": _sgd_momentum,
  "nesterov": _nesterov,
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
  name: str, learning_rate: optax.ScalarOrSchedule, **kwargs: Any
) -> optax.GradientTransformation:
  """Builds an optimizer by name: ``OPTIMIZERS`` first, then any optax alias.

  ``"momentum"`` is SGD with heavy-ball momentum 0.9 and ``"nesterov"`` its Nesterov
  form; every other name is looked up in ``optax`` (``sgd``, ``adam``, ``adamw``,
  ``rmsprop``, ``lion``, …) and called as ``optax.<name>(learning_rate, **kwargs)``.
  The probabilistic preconditioners of :data:`HVP_OPTIMIZERS` (``preconditioned_sgd``,
  ``adaptive_sgd``, ``only_adaptive_sgd``) estimate their step size; ``learning_rate``
  is ignored for them (pass ``initial_lr=``/``fixed_lr=``) and their ``update`` needs
  ``hvp_fn=`` (:func:`make_train_step` with ``hvp=True``).

  Raises:
    ValueError: unknown name, or a name that is not an optimizer alias; or keyword
      arguments the optimizer does not take (named in the message).
  """
  if name in HVP_OPTIMIZERS:
    try:
      return HVP_OPTIMIZERS[name](**kwargs)
    except TypeError as e:
      raise ValueError(f"optimizer {name!r} rejected its arguments {kwargs}: {e}") from e
  factory = OPTIMIZERS.get(name)
  if factory is None:
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory) or name.startswith("_"):
      raise ValueError(
        f"unknown optimizer {name!r}: expected one of {sorted(OPTIMIZERS)} or an optax alias "
        "such as sgd, adam, adamw, rmsprop, lion."
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
  try:
    tx = factory(learning_rate, **kwargs)
  except TypeError as e:
    raise ValueError(f"optimizer {name!r} rejected its arguments {kwargs}: {e}") from e
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"optimizer {name!r} did not return an optax GradientTransformation.")
  return tx


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
    raise ValueError(f"learning rate must be a positive number, got {learning_rate}.")
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


# --------------------------------------------------------------------------- capacity

#: Defaults of ``--capacity`` (the thesis: chunks of a fifth or a tenth, patience 10).
CAPACITY_DEFAULTS: dict[str, Any] = {
  "chunks": 5,
  "patience": 10,
  "policy": "all",
  "cooldown": 0,
  "min_delta": 0.0,
  "smoothing": 0.1,
}


def parse_capacity(spec: str | Mapping[str, Any]) -> dict[str, Any]:
  """Parses ``--capacity`` (``"chunks=5,patience=10,policy=all|activation-std"``).

  Keys: ``chunks`` (chunks per capacity layer, ≥ 2), ``patience`` (steps without
  improvement of the moving average of the training loss that make a plateau, ≥ 1),
  ``policy`` (``all``: every layer with room grows on a plateau, as the thesis did;
  ``activation-std``: the layer whose active units' outputs have the highest standard
  deviation), ``cooldown`` (≥ 0), ``min_delta`` (relative improvement, ≥ 0) and
  ``smoothing`` (weight of the newest loss in the moving average, in (0, 1]). Missing keys
  take :data:`CAPACITY_DEFAULTS`.
  """
  out = dict(CAPACITY_DEFAULTS)
  if isinstance(spec, str):
    items = {}
    for part in (p.strip() for p in spec.split(",")):
      if not part:
        continue
      if "=" not in part:
        raise ValueError(f"--capacity: expected key=value, got {part!r} (in {spec!r}).")
      k, v = (t.strip() for t in part.split("=", 1))
      items[k] = v
  else:
    items = dict(spec)
  unknown = sorted(set(items) - set(CAPACITY_DEFAULTS))
  if unknown:
    raise ValueError(f"--capacity: unknown key(s) {unknown}; keys: {', '.join(CAPACITY_DEFAULTS)}.")
  for k, v in items.items():
    kind = type(CAPACITY_DEFAULTS[k])
    try:
      out[k] = kind(v) if kind is not str else str(v)
    except (TypeError, ValueError):
      raise ValueError(f"--capacity: {k} must be a {kind.__name__}, got {v!r}.") from None
  if out["chunks"] < 2:
    raise ValueError(f"--capacity: chunks must be >= 2, got {out['chunks']}.")
  if out["patience"] < 1 or out["cooldown"] < 0 or out["min_delta"] < 0:
    raise ValueError(f"--capacity: patience >= 1, cooldown >= 0, min_delta >= 0; got {out}.")
  if not 0.0 < out["smoothing"] <= 1.0:
    raise ValueError(f"--capacity: smoothing must be in (0, 1], got {out['smoothing']}.")
  if out["policy"] not in growth.POLICIES:
    raise ValueError(f"--capacity: policy must be one of {growth.POLICIES}, got {out['policy']!r}.")
  return out


# --------------------------------------------------------------------------- metrics

#: The ``metrics`` presets that also run Cockpit's instruments (:func:`make_instruments`),
#: each with the per-layer scope preset it uses (:data:`jaxscope.metrics.registry.PRESETS`).
INSTRUMENT_PRESETS: dict[str, str] = {"economy": "economy", "business": "economy", "full": "full"}

#: The activation-health metrics of the instrument presets (:func:`make_activation_scope`).
ACTIVATION_METRICS: dict[str, tuple[str, ...]] = {
  "activations": ("std", "dead_fraction", "saturation_fraction"),
  "layer_grads": ("norm",),
}


def make_instruments(
  metrics: str | Sequence[str] | None, *, every: int = 1, seed: int = 0
) -> Instruments | None:
  """Cockpit's instruments for a run's ``metrics`` (``None`` unless it names a preset).

  ``"economy"``, ``"business"`` and ``"full"`` give
  ``jaxscope.metrics.instruments(preset=metrics, every=every, seed=seed)`` (Cockpit's
  configurations of the same names, see :mod:`jaxscope.metrics.instruments`); metric-name
  lists and ``"none"`` run no instrument.
  """
  if isinstance(metrics, str) and metrics in INSTRUMENT_PRESETS:
    return instruments(preset=metrics, every=every, seed=seed)
  return None


def make_activation_scope(every: int = 1) -> Scope:
  """The activation-health scope of the instrument presets.

  Measures, per captured Flax layer ``l`` (:mod:`jaxscope.capture`, the ``probe.captured``
  of :meth:`~jaxscope.metrics.Instruments.grad`), the standard deviation of the layer's
  output ``y_l`` (``activations/std/{l}``), the fraction of dead units, ``≤ 0`` for the
  whole batch (``activations/dead_fraction/{l}``), the fraction of entries with
  ``|y| > 3`` (``activations/saturation_fraction/{l}``) and the norm ``‖∂L/∂y_l‖`` of
  the gradient w.r.t. the output (``layer_grads/norm/{l}``).
  """
  return scope(**{t: list(v) for t, v in ACTIVATION_METRICS.items()}, every=every)  # type: ignore[arg-type]


def make_scope(
  metrics: str | Sequence[str] | None = "economy",
  *,
  topics: Sequence[str] | None = None,
  layers: str | None = None,
  exclude: str | None = None,
  depth: int | None = None,
  kind: str = "any",
  every: int = 1,
) -> Scope | None:
  """Builds the scope of a run from command-line style arguments.

  Args:
    metrics: a preset (``"economy"``, ``"full"``; ``"business"`` is the ``economy``
      scope, see :data:`INSTRUMENT_PRESETS`), ``"none"``/``None``/``""`` for no
      per-layer metrics, or metric names (a comma-separated string or a list; built-in,
      registered or plugin metrics, see ``jaxscope list-metrics``), measured on every
      topic in ``topics``. Network metrics (``loss``, ``accuracy``) are always recorded
      by the loop and are ignored here.
    topics: the topics to measure (default: all of ``params``, ``grads``, ``updates``).
    layers: regular expression selecting layers by name (``re.search``).
    exclude: regular expression of layers to leave out.
    depth: layer grouping (see :func:`jaxscope.tree.layout`).
    kind: ``"kernel"``, ``"bias"`` or ``"any"``.
    every: measure every ``every``-th step.

  Returns:
    The scope, or ``None`` when no per-layer metric is asked for.
  """
  if topics is None:
    topics = PARAM_TOPICS
  topics = list(topics)
  for t in topics:
    if t not in PARAM_TOPICS:
      raise ValueError(f"unknown topic {t!r}; topics: {', '.join(PARAM_TOPICS)}.")
  if metrics is None or metrics in ("", "none"):
    return None
  if isinstance(metrics, str) and metrics in INSTRUMENT_PRESETS:
    metrics = INSTRUMENT_PRESETS[metrics]
  if isinstance(metrics, str) and metrics in registry.PRESETS:
    lists = {t: v for t, v in registry.preset_metrics(metrics).items() if t in topics}
  else:
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else metrics
    names = [n for n in names if n]
    lists = {t: [] for t in topics}
    for n in names:
      n = INSTRUMENT_PRESETS.get(n, n)
      if n in registry.PRESETS:
        for t, specs in registry.preset_metrics(n).items():
          if t in lists:
            lists[t].extend(s for s in specs if s not in lists[t])
        continue
      try:
        m = registry.get(n)
      except KeyError as e:
        raise ValueError(str(e.args[0])) from None
      if isinstance(m, NetworkMetric):
        continue  # loss and accuracy are recorded by the loop itself.
      for t in topics:
        if n not in lists[t]:
          lists[t].append(n)
  lists = {t: v for t, v in lists.items() if v}
  if not lists:
    return None
  return scope(**lists, every=every, include=layers, exclude=exclude, kind=kind, depth=depth)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the step


class TrainState(NamedTuple):
  """Everything a training run carries from step to step (and checkpoints)."""

  step: jax.Array
  """``int32`` number of updates applied so far."""
  params: Any
  """The model's parameters."""
  model_state: Any
  """Non-parameter collections (e.g. ``{"batch_stats": …}``), ``{}`` when none."""
  opt_state: Any
  """The optimizer's state (holding the scope's state when metrics are on)."""
  instruments: Any = ()
  """The instruments' states, ``()`` without instruments; with them (the ``metrics``
  presets, see :func:`init_instruments`) ``{"cockpit": InstrumentsState}`` (its PRNG key
  stored as raw ``uint32`` data) and, when the model's layers are captured,
  ``"activations"``: the activation scope's state."""


def _pack(state: InstrumentsState) -> InstrumentsState:
  """The instruments' state with its PRNG key as raw ``uint32`` data (a plain array)."""
  return state._replace(key=jax.random.key_data(state.key))


def _unpack(state: InstrumentsState) -> InstrumentsState:
  """Inverse of :func:`_pack`."""
  return state._replace(key=jax.random.wrap_key_data(state.key))


def _per_example_losses(task: str, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``ℓᵢ``, shape ``[B]``: softmax cross-entropy with integer labels (classification) or
  the mean squared error of example ``i`` over its output entries (regression)."""
  if task == "regression":
    return jnp.mean((outputs - y) ** 2, axis=tuple(range(1, outputs.ndim)))
  return optax.softmax_cross_entropy_with_integer_labels(outputs, y)


def _loss_and_metrics(
  task: str, outputs: jax.Array, y: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example losses reduced to a (masked) mean, and the batch's accuracy."""
  per = _per_example_losses(task, outputs, y)
  if mask is None:
    mask = jnp.ones(per.shape, jnp.float32)
  out = {"loss_sum": jnp.sum(per * mask), "count": mask.sum()}
  if task != "regression":
    correct = (jnp.argmax(outputs, -1) == y).astype(jnp.float32)
    out["correct"] = jnp.sum(correct * mask)
  return out["loss_sum"] / jnp.maximum(out["count"], 1.0), out


def _losses_fn(
  model: Any, task: str, model_state: Any, rng: jax.Array | None
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]:
  """``losses_fn(params, x, y) -> (ℓ [B], ({"accuracy"}, new_model_state))`` in training mode.

  The step's loss is ``mean(ℓ)``; the new model state (BatchNorm statistics) travels as
  auxiliary output, so the loss and its gradient are those of one training-mode pass.
  """

  def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> Any:
    variables = {"params": params, **model_state}
    outputs, new_model_state = model.apply(variables, x, train=True, rng=rng)
    losses = _per_example_losses(task, outputs, y)
    aux: dict[str, jax.Array] = {}
    if task != "regression":
      aux["accuracy"] = jnp.mean((jnp.argmax(outputs, -1) == y).astype(jnp.float32))
    return losses, (aux, new_model_state)

  return losses_fn


def init_instruments(
  model: Any,
  inst: Instruments,
  params: Any,
  model_state: Any,
  x: Any,
  y: Any,
  *,
  task: str = "classification",
  activation_scope: Scope | None = None,
) -> dict[str, Any]:
  """The initial :attr:`TrainState.instruments` of a step built with ``instruments=inst``.

  Args:
    model: the :class:`jaxscope.models.ModelDef`.
    inst: the instruments (:func:`make_instruments`).
    params: the initial parameters (``distance`` is measured from them).
    model_state: the initial non-parameter collections.
    x: a training batch (arrays or ``jax.ShapeDtypeStruct``; only the shapes are used),
      to size the captured layers of the activation scope.
    y: its labels.
    task: ``"classification"`` or ``"regression"``.
    activation_scope: :func:`make_activation_scope`, or ``None``.

  Returns:
    ``{"cockpit": inst.init(params)}``, the PRNG key stored as its raw ``uint32`` data so
    that every leaf is a plain array, and ``"activations"``: the activation scope's
    initial state, when ``activation_scope`` is given and the model's loss calls Flax
    layers (else the entry is left out and the step measures no activation).
  """
  istate = inst.init(params)
  out: dict[str, Any] = {"cockpit": _pack(istate)}
  if activation_scope is not None:
    losses_fn = _losses_fn(model, task, model_state, jax.random.key(0))

    def captured(state: InstrumentsState, p: Any, xb: Any, yb: Any) -> Any:
      return inst.grad(state, losses_fn, p, xb, yb, has_aux=True).captured

    cap = jax.eval_shape(captured, istate, params, x, y)
    if cap is not None and cap.outputs:
      out["activations"] = activation_scope.init(
        activations=dict(cap.outputs), layer_grads=dict(cap.grads)
      )
  return out


def make_train_step(
  model: Any,
  tx: optax.GradientTransformation,
  *,
  task: str = "classification",
  schedule: optax.Schedule | None = None,
  seed: int = 0,
  monitored: bool = False,
  hvp: bool = False,
  instruments: Instruments | None = None,
  activation_scope: Scope | None = None,
  learning_rate: float | None = None,
  capacity: Mapping[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure train step ``step(state, x, y, measure=True) -> (state, values)``.

  ``values`` holds ``loss`` (mean over the batch), ``train/accuracy`` (classification),
  ``lr`` (when ``schedule`` is given, or read from a
  :func:`jaxscope.transforms.ratio_adaptive_lr` state in ``tx`` with its
  ``ratio_lr/…`` values, see :func:`jaxscope.transforms.ratio_lr_values`) and, when
  ``monitored`` and ``measure``, the scope's per-layer metrics. Jit it with
  ``static_argnames="measure"``: the ``False`` variant compiles without any measurement.

  With ``instruments`` (:func:`make_instruments`; ``state.instruments`` from
  :func:`init_instruments`) the loss and gradient come from
  :meth:`~jaxscope.metrics.Instruments.grad` on the per-example losses ``ℓᵢ`` (the same
  mean loss and gradient), and ``measure=True`` adds Cockpit's values (``alpha``,
  ``norm_test``, ``hess_trace``, … without their ``loss``) and, with ``activation_scope``,
  the activation health of the captured layers (``activations/{stat}/{layer}``,
  ``layer_grads/norm/{layer}``). The instruments decide by their own count which steps
  they measure (``0, every, 2·every, …``), so pass ``measure = step % every == 0``;
  ``alpha`` (the α of the previous update) is in ``values`` on every step but is fresh
  only at steps ``t ≥ 1`` with ``(t − 1) % every == 0``.

  Per-example statistics (norm, inner-product and orthogonality tests, histograms, TIC)
  need the loss of each example on its own; as in Cockpit they are ill-defined for
  BatchNorm in training mode (an example's loss depends on the batch), and the
  per-example pass draws dropout masks other than the batch pass's (each example is
  evaluated alone with the step's key). The step's loss, gradient and update are
  unchanged by the instruments.

  Args:
    model: a :class:`jaxscope.models.ModelDef` (``apply(variables, x, train=, rng=)``).
    tx: the optimizer; with ``monitored=True`` it must be a
      :func:`jaxscope.transforms.monitored` transformation (or contain one).
    task: ``"classification"`` (softmax cross-entropy, integer labels) or
      ``"regression"`` (mean squared error).
    schedule: the learning-rate schedule, only to record ``lr``.
    seed: the seed of the dropout keys, ``fold_in(PRNGKey(seed), step)``.
    monitored: whether ``tx`` measures a scope.
    hvp: pass ``hvp_fn=`` (the Hessian-vector product of the same minibatch loss, by
      :func:`jaxscope.transforms.value_grad_and_hvp`) to ``tx.update``, as the
      probabilistic preconditioners need; their log joins ``values``. The step then also
      takes a static ``phase`` (:func:`jaxscope.transforms.preconditioner_phase` of the
      step count; jit with ``static_argnames=("measure", "phase")``): the preconditioner
      traces only that phase, and the build and apply phases skip the HVP.
    instruments: Cockpit's instruments, or ``None``.
    activation_scope: the scope of the captured layers (:func:`make_activation_scope`);
      used with ``instruments`` when ``state.instruments`` holds its state.
    learning_rate: the learning rate given to the instruments (``cabs``) when ``values``
      holds no ``lr`` (the recorded ``lr`` is used first).
    capacity: :func:`parse_capacity`'s dict for a capacity model (``model_state`` holds
      its ``capacity`` collection, ``state.instruments["growth"]`` the
      :class:`~jaxscope.models.growth.GrowthState`, ``tx`` is wrapped in
      :func:`jaxscope.transforms.masked_freeze`): the step passes the trainable mask,
      then folds the loss into the plateau rule and grows, freezes and re-initialises on a
      plateau (:func:`jaxscope.models.growth.growth_update`); ``values`` gets
      ``capacity/active/{layer}``, ``capacity/frozen/{layer}``, ``capacity/expanded``.
  """
  if task not in ("classification", "regression"):
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}.")
  base_key = jax.random.key(seed)

  def step(
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    measure: bool = True,
    phase: int | None = None,
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(base_key, state.step)
    losses_fn = _losses_fn(model, task, state.model_state, rng)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
      losses, aux = losses_fn(params, x, y)
      return jnp.mean(losses), aux

    extra: dict[str, Any] = {}
    if hvp and phase is not None:
      extra["phase"] = phase
    need_hvp = hvp and (phase is None or phase < 3)  # the build and apply phases need no HVP
    probe = None
    if instruments is not None:
      istate = _unpack(state.instruments["cockpit"])
      probe = instruments.grad(istate, losses_fn, state.params, x, y, has_aux=True)
      loss, (aux, new_model_state), grads = probe.loss, probe.aux, probe.grads
      if need_hvp:
        _, extra["hvp_fn"] = jax.linearize(
          lambda p: jax.grad(loss_fn, has_aux=True)(p)[0], state.params
        )
    elif need_hvp:
      (loss, (aux, new_model_state)), grads, extra["hvp_fn"] = transforms.value_grad_and_hvp(
        loss_fn, state.params, has_aux=True
      )
    else:
      (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
      )
    if monitored:
      extra["measure"] = measure
    if capacity is not None:
      extra["trainable"] = growth.trainable(
        state.params, state.model_state["capacity"], state.instruments["growth"]
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    values: dict[str, jax.Array] = {"loss": loss}
    if task == "classification":
      values["train/accuracy"] = aux["accuracy"]
    if schedule is not None:
      values["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    # A ratio-adaptive rate reports itself: lr, factor, mean and per-layer ratios;
    # a probabilistic preconditioner its lr, α, w, λ, phase and singular values.
    values.update(transforms.ratio_lr_values(opt_state))
    values.update(transforms.preconditioner_log(opt_state))
    inst_state = state.instruments
    if instruments is not None and probe is not None:
      lr = values.get("lr", learning_rate)
      ivals, istate = instruments.update(istate, probe, updates, learning_rate=lr)
      inst_state = {**state.instruments, "cockpit": _pack(istate)}
      if measure:
        values.update({k: v for k, v in ivals.items() if k not in ("loss", MEASURED)})
      elif "alpha" in ivals:
        values["alpha"] = ivals["alpha"]
      if (
        activation_scope is not None
        and "activations" in state.instruments
        and probe.captured is not None
      ):
        avals, inst_state["activations"] = activation_scope.update(
          state.instruments["activations"],
          activations=dict(probe.captured.outputs),
          layer_grads=dict(probe.captured.grads),
          measure=bool(measure),
        )
        if measure:
          values.update({k: v for k, v in avals.items() if k != MEASURED})
    if monitored and measure:
      values.update(
        {k: v for k, v in transforms.metrics(opt_state).items() if k != MEASURED},
      )
    model_state = {**state.model_state, **new_model_state}
    if capacity is not None:
      cap_vars = state.model_state["capacity"]
      act_std = None
      if capacity["policy"] == "activation-std":
        if probe is not None and probe.captured is not None:
          outputs = dict(probe.captured.outputs)
        else:  # One extra forward pass records the layers' outputs.
          with capture.intercept() as rec:
            model.apply({"params": state.params, **state.model_state}, x, train=True, rng=rng)
          outputs = dict(rec.outputs)
        act_std = growth.activation_std(outputs, state.params, cap_vars)
      params, cap_vars, gstate = growth.growth_update(
        state.instruments["growth"],
        value=loss,
        params=params,
        capacity=cap_vars,
        key=jax.random.fold_in(rng, 1),
        policy=capacity["policy"],
        activation_std=act_std,
        patience=capacity["patience"],
        cooldown=capacity["cooldown"],
        min_delta=capacity["min_delta"],
        smoothing=capacity["smoothing"],
      )
      model_state = {**model_state, "capacity": cap_vars}
      inst_state = {**(inst_state or {}), "growth": gstate}
      values.update(growth.growth_values(gstate, cap_vars))
    new_state = TrainState(
      optax.safe_increment(state.step), params, model_state, opt_state, inst_state
    )
    return new_state, values

  return step


def make_evaluate(
  model: Any,
  x: np.ndarray,
  y: np.ndarray,
  *,
  task: str = "classification",
  batch_size: int = 500,
) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """Builds ``evaluate(params, model_state) -> {"test/loss", "test/accuracy"}``.

  The whole split is evaluated: it is padded to a multiple of ``batch_size``, kept on
  the device, and scanned batch by batch; padded examples carry zero weight, so the
  result is the exact mean over the ``n`` examples,
  ``L = (1/n) Σ_i ℓ(f(x_i), y_i)`` and ``acc = (1/n) Σ_i [argmax f(x_i) = y_i]``.
  The model runs in evaluation mode (``train=False``: running BatchNorm statistics,
  no dropout).
  """
  n = len(x)
  if n == 0:
    raise ValueError("make_evaluate: the evaluation split is empty.")
  if len(y) != n:
    raise ValueError(f"make_evaluate: x has {n} examples but y has {len(y)}.")
  bs = max(1, min(batch_size, n))
  nb = -(-n // bs)
  pad = nb * bs - n
  xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(nb, bs, *x.shape[1:])
  ys = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)]).reshape(nb, bs, *y.shape[1:])
  mask = (np.arange(nb * bs) < n).astype(np.float32).reshape(nb, bs)
  xs, ys, mask = jax.device_put(xs), jax.device_put(ys), jax.device_put(mask)

  @jax.jit
  def evaluate(params: Any, model_state: Any) -> dict[str, jax.Array]:
    def body(carry: dict[str, jax.Array], batch: tuple[jax.Array, ...]) -> tuple[Any, None]:
      xb, yb, mb = batch
      outputs, _ = model.apply({"params": params, **model_state}, xb, train=False)
      _, sums = _loss_and_metrics(task, outputs, yb, mb)
      return jax.tree.map(jnp.add, carry, sums), None

    zero = {"loss_sum": jnp.zeros(()), "count": jnp.zeros(())}
    if task == "classification":
      zero["correct"] = jnp.zeros(())
    sums, _ = jax.lax.scan(body, zero, (xs, ys, mask))
    out = {"test/loss": sums["loss_sum"] / n}
    if task == "classification":
      out["test/accuracy"] = sums["correct"] / n
    return out

  return evaluate


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainConfig:
  """What :func:`train` runs; every field is a ``jaxscope train`` flag."""

  model: str = "lenet5"
  dataset: str = "digits"
  data_dir: str | None = None
  batch_size: int = 64
  epochs: int | None = 10
  """Number of epochs (ignored when ``steps`` is given)."""
  steps: int | None = None
  """Total number of updates; overrides ``epochs``."""
  optimizer: str = "momentum"
  lr: float = 0.05
  optimizer_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  """Extra keyword arguments of the optimizer (e.g. ``{"weight_decay": 1e-4}``)."""
  schedule: str = "constant"
  """``constant``, ``exponential:γ``, ``cosine`` (see :func:`make_schedule`) or
  ``ratio``: the optimizer at the constant ``lr`` followed by
  :func:`jaxscope.transforms.ratio_adaptive_lr` with the ``ratio_*`` fields."""
  ratio_target: float = 1e-3
  """``schedule="ratio"``: the target update/weight ratio."""
  ratio_smoothing: float = 0.9
  """``schedule="ratio"``: the weight of the newest ratio in the moving average."""
  ratio_max_factor: float | None = 500.0
  """``schedule="ratio"``: the cap of ``lr_effective / lr`` (``None``: none)."""
  ratio_floor: float | None = None
  """``schedule="ratio"``: the floor of ``lr_effective / lr`` (``None``: none)."""
  ratio_mode: str = "code"
  """``schedule="ratio"``: ``"code"`` (the original implementation) or ``"thesis"``."""
  metrics: str = "economy"
  """A preset, ``none``, or a comma list of metric names (:func:`make_scope`). The presets
  ``economy``, ``business`` and ``full`` are Cockpit's configurations: the per-layer scope
  (``economy``; ``full`` for ``full``) plus :func:`make_instruments` of the same name and
  the activation health of the captured layers (:func:`make_activation_scope`); see
  :func:`make_train_step` for what per-example statistics mean with BatchNorm and
  dropout. ``topics``, ``layers``, ``exclude``, ``depth`` and ``kind`` select the
  per-layer scope only."""
  topics: list[str] | None = None
  layers: str | None = None
  exclude: str | None = None
  depth: int | None = None
  kind: str = "any"
  every: int = 1
  eval_every: int | None = None
  """Steps between evaluations (default: once per epoch); also at step 0 and the end."""
  eval_batch_size: int = 500
  checkpoint_every: int | None = None
  """Steps between checkpoints (default: once per epoch); also at step 0 and the end.
  ``0`` keeps only the initial and final checkpoints."""
  max_to_keep: int | None = None
  """Checkpoints kept (``None``: all, as the checkpoint analyses need the trajectory)."""
  out: str = "runs/default"
  tensorboard: bool = False
  seed: int = 0
  quiet: bool = False
  resume: bool = False
  """Continue from the newest readable checkpoint in ``out`` (if any)."""
  live_diagnosis: bool = True
  """At every evaluation, run :func:`jaxscope.diagnose.diagnose` on the metrics so far and
  print each new critical finding once (to stderr); warnings (trends over the whole run,
  which a prefix does not show reliably) at the final evaluation."""
  capacity: str | None = None
  """Dynamic capacity (:mod:`jaxscope.models.growth`) for the ``capacity_mlp`` /
  ``capacity_cnn`` models: ``"chunks=5,patience=10,policy=all"`` (also ``cooldown``,
  ``min_delta``, ``smoothing``; see :func:`parse_capacity`). ``None``: static network."""
  model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  """Extra keyword arguments of the model (e.g. ``{"depth": 56}``)."""
  data_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  """Extra keyword arguments of the dataset loader."""


class TrainResult(NamedTuple):
  """What :func:`train` returns."""

  state: TrainState
  """The final train state (on the device)."""
  run_dir: Path
  steps: int
  """Number of updates applied (the final step)."""
  final_eval: dict[str, float]
  """``test/loss`` (and ``test/accuracy``) of the final parameters."""
  interrupted: bool
  """Whether the run was stopped by Ctrl-C (logs and a final checkpoint were written)."""
  wall_time: float


# Keys of the config that must agree when resuming (the others may change).
_RESUME_KEYS = (
  "model",
  "dataset",
  "batch_size",
  "optimizer",
  "optimizer_args",
  "seed",
  "capacity",
)


def _check_config(config: TrainConfig) -> None:
  def positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
      return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
      what = "a non-negative int" if allow_zero else "a positive int"
      raise ValueError(f"train: {name} must be {what}, got {value!r}.")

  positive("batch_size", config.batch_size)
  positive("epochs", config.epochs, allow_none=True)
  positive("steps", config.steps, allow_none=True)
  positive("every", config.every)
  positive("eval_every", config.eval_every, allow_none=True)
  positive("eval_batch_size", config.eval_batch_size)
  positive("checkpoint_every", config.checkpoint_every, allow_none=True, allow_zero=True)
  positive("max_to_keep", config.max_to_keep, allow_none=True)
  if config.epochs is None and config.steps is None:
    raise ValueError("train: give epochs or steps.")
  if config.layers is not None:
    try:
      re.compile(config.layers)
    except re.error as e:
      raise ValueError(f"train: layers {config.layers!r} is not a valid regex: {e}") from None


def _versions() -> dict[str, str]:
  import flax
  import orbax.checkpoint as ocp

  import jaxscope

  return {
    "jaxscope": jaxscope.__version__,
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "orbax-checkpoint": getattr(ocp, "__version__", "?"),
    "backend": jax.default_backend(),
  }


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The data order of ``epoch``: a permutation drawn from ``(seed, epoch)``."""
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


class _Checkpoints:
  """The run's orbax CheckpointManager: atomic, asynchronous saves with JSON metadata."""

  def __init__(self, directory: Path, max_to_keep: int | None) -> None:
    import orbax.checkpoint as ocp

    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(
      directory.absolute(), options=options, item_names=("state", "meta")
    )
    self.saved: set[int] = set(self.manager.all_steps())

  def save(self, step: int, state: TrainState, meta: Mapping[str, Any]) -> None:
    if step in self.saved:
      return
    ocp = self._ocp
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
      ),
      force=True,
    )
    self.saved.add(step)

  def restore_latest(self, abstract: TrainState) -> tuple[TrainState, dict[str, Any], bool] | None:
    """The newest step that restores into ``abstract``: ``(state, meta, legacy)``.

    A checkpoint written before :attr:`TrainState.instruments` existed (four fields) is
    restored with ``legacy=True`` and ``instruments=()``.
    """
    ocp = self._ocp
    legacy_target = {f: getattr(abstract, f) for f in TrainState._fields if f != "instruments"}
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      for target in (abstract, legacy_target):
        try:
          r = self.manager.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
          )
        except Exception as e:  # A damaged step: fall back to an older one.
          error = error or e
          continue
        if target is abstract:
          return r.state, dict(r.meta), False
        return TrainState(**r.state), dict(r.meta), True
      warnings.warn(
        f"checkpoint {step} could not be restored ({error}); trying older.", stacklevel=3
      )
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class _StopFlag:
  """Turns the first Ctrl-C into a request to stop after the current step.

  The loop then evaluates, writes a final checkpoint and flushes the logs; a second
  Ctrl-C interrupts at once (``KeyboardInterrupt``), still closing the recorder and
  waiting for checkpoints being written.
  """

  def __init__(self) -> None:
    self.requested = False

  @contextlib.contextmanager
  def catch_sigint(self) -> Any:
    if threading.current_thread() is not threading.main_thread():
      yield  # Signal handlers can only be installed from the main thread.
      return

    def handler(signum: int, frame: Any) -> None:
      if self.requested:
        raise KeyboardInterrupt
      self.requested = True
      print(
        "\njaxscope: stopping after this step (writing logs and a checkpoint); "
        "Ctrl-C again to abort.",
        file=sys.stderr,
        flush=True,
      )

    previous = signal.signal(signal.SIGINT, handler)
    try:
      yield
    finally:
      signal.signal(signal.SIGINT, previous)


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
  """Trains ``config.model`` on ``config.dataset`` and writes a run directory.

  Args:
    config: the run's configuration (default :class:`TrainConfig`).
    **overrides: fields replacing those of ``config``.

  Returns:
    A :class:`TrainResult`. Ctrl-C stops the run cleanly: pending metrics are flushed,
    a final checkpoint is written, and the result says ``interrupted=True``.

  Example:
    >>> import tempfile
    >>> from jaxscope.train import train
    >>> r = train(model="mlp", dataset="sine", steps=20, batch_size=32, optimizer="adam",
    ...           lr=1e-2, out=tempfile.mkdtemp(), quiet=True)
    >>> r.steps, sorted(r.final_eval)
    (20, ['test/loss'])
  """
  from jaxscope import data as jdata
  from jaxscope import models as jmodels

  config = dataclasses.replace(config or TrainConfig(), **overrides)
  _check_config(config)
  t_start = time.perf_counter()

  # The split is the dataset's own (seed via data_args); the run seed varies init and order.
  ds = jdata.load(config.dataset, config.data_dir, **config.data_args)
  task = getattr(ds, "task", "classification")
  n_train = len(ds.train_x)
  if n_train < config.batch_size:
    raise ValueError(
      f"train: batch_size {config.batch_size} is larger than the {n_train} training examples."
    )
  steps_per_epoch = n_train // config.batch_size
  total = config.steps if config.steps is not None else config.epochs * steps_per_epoch  # type: ignore[operator]
  eval_every = config.eval_every or steps_per_epoch
  ckpt_every = steps_per_epoch if config.checkpoint_every is None else config.checkpoint_every

  capacity_cfg = parse_capacity(config.capacity) if config.capacity else None
  model_args = dict(config.model_args)
  if capacity_cfg is not None:
    if not config.model.startswith("capacity_"):
      raise ValueError(
        f"train: --capacity needs a model with capacity layers (capacity_mlp, capacity_cnn), "
        f"got {config.model!r}."
      )
    if config.optimizer in HVP_OPTIMIZERS:
      raise ValueError(f"train: --capacity cannot be combined with {config.optimizer!r}.")
    model_args.setdefault("chunks", capacity_cfg["chunks"])
  model = jmodels.build(config.model, tuple(ds.train_x.shape[1:]), ds.num_classes, **model_args)
  if config.optimizer in HVP_OPTIMIZERS and config.schedule != "constant":
    raise ValueError(
      f"train: optimizer {config.optimizer!r} estimates its own step size; use "
      f"schedule='constant' (got {config.schedule!r})."
    )
  phase_of: Callable[[int], int] | None = None
  if config.schedule == "ratio":
    # The rate is steered by the update/weight ratio; the state reports it (ratio_lr_values).
    schedule = None
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
    schedule = None
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
      config.schedule, config.lr, steps_per_epoch=steps_per_epoch, total_steps=total
    )
    tx = make_optimizer(config.optimizer, schedule, **config.optimizer_args)
  if capacity_cfg is not None:  # Frozen chunks: zero update, optimizer state kept.
    tx = transforms.masked_freeze(tx)
  sc = make_scope(
    config.metrics,
    topics=config.topics,
    layers=config.layers,
    exclude=config.exclude,
    depth=config.depth,
    kind=config.kind,
    every=config.every,
  )
  if sc is not None:
    tx = transforms.monitored(tx, sc)
  inst = make_instruments(config.metrics, every=config.every, seed=config.seed)
  act_scope = make_activation_scope(config.every) if inst is not None else None
  batch_shapes = tuple(  # A training batch's shapes, to size the captured layers.
    jax.ShapeDtypeStruct((config.batch_size, *a.shape[1:]), jax.dtypes.canonicalize_dtype(a.dtype))
    for a in (ds.train_x, ds.train_y)
  )

  def init_state() -> TrainState:
    variables = model.init(jax.random.key(config.seed), jnp.asarray(ds.train_x[:1]))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    inst_state: Any = ()
    if inst is not None:
      inst_state = init_instruments(
        model, inst, params, model_state, *batch_shapes, task=task, activation_scope=act_scope
      )
    if capacity_cfg is not None:
      inst_state = {
        **(inst_state or {}),
        "growth": growth.growth_init(params, model_state["capacity"]),
      }
    return TrainState(jnp.zeros((), jnp.int32), params, model_state, tx.init(params), inst_state)

  step_fn = jax.jit(
    make_train_step(
      model,
      tx,
      task=task,
      schedule=schedule,
      seed=config.seed,
      monitored=sc is not None,
      hvp=config.optimizer in HVP_OPTIMIZERS,
      instruments=inst,
      activation_scope=act_scope,
      learning_rate=config.lr,
      capacity=capacity_cfg,
    ),
    static_argnames=("measure", "phase"),
    donate_argnums=0,
  )
  evaluate = make_evaluate(
    model, ds.test_x, ds.test_y, task=task, batch_size=config.eval_batch_size
  )
  train_x = jax.device_put(ds.train_x)
  train_y = jax.device_put(ds.train_y)
  gather = jax.jit(lambda idx: (train_x[idx], train_y[idx]))

  run_dir = Path(config.out)
  config_file = run_dir / "config.json"
  existing = (run_dir / "metrics.jsonl").exists() or any((run_dir / CHECKPOINT_DIR).glob("*"))
  if existing and not config.resume:
    raise ValueError(
      f"train: {run_dir} already holds a run; pass resume=True (--resume) to continue it, "
      "or choose another output directory (--out)."
    )
  if config.resume and config_file.exists():
    old = json.loads(config_file.read_text())
    for key in _RESUME_KEYS:
      if key in old and old[key] != getattr(config, key):
        raise ValueError(
          f"train(resume=True): {key}={getattr(config, key)!r} differs from the run's "
          f"{old[key]!r} in {config_file}."
        )
  ckpt = _Checkpoints(run_dir / CHECKPOINT_DIR, config.max_to_keep)
  state: TrainState | None = None
  start = 0
  alpha_from = 1  # The first step whose "alpha" is recorded (the α of the update before).
  if config.resume and ckpt.saved:
    restored = ckpt.restore_latest(jax.eval_shape(init_state))
    if restored is None:
      ckpt.close()
      raise ValueError(
        f"train(resume=True): none of the checkpoints {sorted(ckpt.saved)} in "
        f"{run_dir / CHECKPOINT_DIR} could be restored into this configuration (the saved "
        "state depends on the model, the optimizer and the metrics)."
      )
    state, _, legacy = restored
    start = int(state.step)
    if legacy and inst is not None:
      # A run written before the instruments' state was checkpointed: they start afresh
      # (their count set to the step, so that they measure the same steps).
      warnings.warn(
        f"train(resume=True): the checkpoint of step {start} holds no instrument state; "
        "the instruments start afresh (alpha from the next update on).",
        stacklevel=2,
      )
      fresh = jax.jit(init_state)().instruments
      fresh["cockpit"] = fresh["cockpit"]._replace(count=jnp.asarray(start, jnp.int32))
      state = state._replace(instruments=fresh)
      alpha_from = start + 1
  if state is None:
    state = jax.jit(init_state)()
  record_config = {**dataclasses.asdict(config), "versions": _versions(), "task": task}
  record_config["steps_per_epoch"] = steps_per_epoch
  record_config["total_steps"] = total
  if start and config_file.exists():
    # Keep the original configuration file; a resumed run only extends the run.
    record_config = None  # type: ignore[assignment]
  recorder = Recorder(run_dir, tensorboard=config.tensorboard, config=record_config)

  bar = None
  if not config.quiet:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, unit="step", desc=f"{config.model}/{config.dataset}")

  last_eval: dict[str, float] = {}
  last_eval_step = [-1]

  reported: set[str] = set()

  def live_diagnosis() -> None:
    # At an evaluation (the loop waits for the device there anyway): the rules over the
    # history so far; each finding's name is printed once, warnings and worse only.
    from jaxscope.diagnose import diagnose
    from jaxscope.record import History

    recorder.flush()
    try:
      findings = diagnose(History.load(run_dir))
    except Exception as e:  # A diagnosis must never stop training.
      warnings.warn(f"jaxscope: live diagnosis failed: {e}", stacklevel=2)
      return
    # Warnings judge trends (plateaus, ratios, spikes) over the whole run, which a prefix
    # does not show reliably: they wait for the final evaluation; critical ones never wait.
    severities = ("critical", "warning") if last_eval_step[0] >= total else ("critical",)
    for f in findings:
      if f.name not in reported and f.severity in severities:
        reported.add(f.name)
        msg = f"jaxscope [{f.severity}] {f.name}: {f.summary} (jaxscope diagnose {run_dir})"
        if bar is not None:
          bar.write(msg, file=sys.stderr)
        else:
          print(msg, file=sys.stderr)

  def run_eval(step: int) -> None:
    values = evaluate(state.params, state.model_state)
    recorder.write(step, values)
    last_eval.clear()
    last_eval.update({k: float(v) for k, v in values.items()})
    last_eval_step[0] = step
    if config.live_diagnosis and step > 0:
      live_diagnosis()  # after last_eval_step is set

  def meta(step: int) -> dict[str, Any]:
    # eval_* are the latest evaluation's, taken at eval_step (≤ step).
    return {
      "step": step,
      "epoch": step / steps_per_epoch,
      "wall_time": time.perf_counter() - t_start,
      **{k.replace("test/", "eval_"): v for k, v in last_eval.items()},
      **({"eval_step": last_eval_step[0]} if last_eval else {}),
    }

  stop = _StopFlag()
  step = start
  try:
    with stop.catch_sigint():
      if start == 0:
        run_eval(0)
        ckpt.save(0, state, meta(0))
      order = None
      order_epoch = -1
      pending_loss: jax.Array | None = None
      while step < total and not stop.requested:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
          order = _epoch_order(config.seed, epoch, n_train)
          order_epoch = epoch
        idx = order[i * config.batch_size : (i + 1) * config.batch_size]  # type: ignore[index]
        x, y = gather(idx)
        measure = (sc is not None or inst is not None) and step % config.every == 0
        phase = phase_of(step) if phase_of is not None else None
        state, values = step_fn(state, x, y, measure=measure, phase=phase)
        if "alpha" in values and not (step >= alpha_from and (step - 1) % config.every == 0):
          # α of the update of step t - 1 is known at step t; other steps repeat an old one.
          values = {k: v for k, v in values.items() if k != "alpha"}
        recorder.write(step, values)
        if bar is not None:
          if pending_loss is not None and (step % 10 == 0 or step == total - 1):
            shown = {k.replace("/", "_"): f"{v:.4f}" for k, v in last_eval.items()}
            bar.set_postfix(loss=f"{float(pending_loss):.4f}", **shown)
          pending_loss = values["loss"]
          bar.update(1)
        step += 1
        if step % eval_every == 0 or step == total or stop.requested:
          run_eval(step)
        if (ckpt_every and step % ckpt_every == 0) or step == total or stop.requested:
          ckpt.save(step, state, meta(step))
  finally:
    if bar is not None:
      bar.close()
    recorder.close()
    ckpt.close()
  if not last_eval:
    run_eval_values = evaluate(state.params, state.model_state)
    last_eval = {k: float(v) for k, v in run_eval_values.items()}
  return TrainResult(
    state, run_dir, step, dict(last_eval), stop.requested, time.perf_counter() - t_start
  )
