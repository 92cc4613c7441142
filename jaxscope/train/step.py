"""The reference loop's train step: one pure, jittable function of the train state.

:func:`make_train_step` builds ``step(state, x, y, measure=True) -> (state, values)`` from
a model, an optimizer and what to measure; the pieces of one step (gradients with or
without the instruments' probe, the instruments' values, capacity growth) are the
functions below.

Per-example statistics of the instruments (norm, inner-product and orthogonality tests,
histograms, TIC) need the loss of each example on its own; as in Cockpit they are
ill-defined for BatchNorm in training mode (an example's loss depends on the batch), and
the per-example pass draws dropout masks other than the batch pass's (each example is
evaluated alone with the step's key). The step's loss, gradient and update are unchanged
by the instruments.

Precision: a model that computes in a low-precision type (``dtype="bfloat16"``) has its
outputs cast to float32 before the loss, and every floating value of the step is recorded
as float32 (the metrics accumulate in float32 themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import capture, transforms
from jaxscope.analysis.kernel import per_example_losses, token_sums
from jaxscope.metrics.instruments import Instruments, InstrumentsState
from jaxscope.metrics.scope import MEASURED, Scope
from jaxscope.models import growth
from jaxscope.packed import PackedValues

__all__ = ["TrainState", "init_instruments", "make_train_step"]


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


def _losses_fn(
  model: Any, task: str, model_state: Any, rng: jax.Array | None
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]:
  """``losses_fn(params, x, y) -> (ℓ [B], ({"accuracy"}, new_model_state))`` in training mode.

  The step's loss is ``mean(ℓ)``; the new model state (BatchNorm statistics) travels as
  auxiliary output, so the loss and its gradient are those of one training-mode pass.
  Outputs of a type narrower than float32 (bfloat16, float16) are cast to float32 first.
  """

  def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> Any:
    variables = {"params": params, **model_state}
    outputs, new_model_state = model.apply(variables, x, train=True, rng=rng)
    outputs = _at_least_float32(outputs)
    losses = per_example_losses(task, outputs, y)
    aux: dict[str, jax.Array] = {}
    if task != "regression":
      _, hits, count = token_sums(task, outputs, y)  # Ignored tokens (labels < 0) left out.
      aux["accuracy"] = jnp.sum(hits) / jnp.maximum(jnp.sum(count), 1.0)
    return losses, (aux, new_model_state)

  return losses_fn


def _at_least_float32(x: Any) -> Any:
  """``x`` as float32 when it is a floating array narrower than float32, else ``x``."""
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


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


def _step_values(
  g: _Gradients, task: str, schedule: optax.Schedule | None, step: jax.Array, opt_state: Any
) -> dict[str, jax.Array]:
  """What every step records: the loss, the accuracy (classification), the scheduled
  ``lr``, and what the optimizer reports of itself."""
  values: dict[str, jax.Array] = {"loss": g.loss}
  if task == "classification":
    values["train/accuracy"] = g.aux["accuracy"]
  if schedule is not None:
    values["lr"] = jnp.asarray(schedule(step), jnp.float32)
  # A ratio-adaptive rate reports itself: lr, factor, mean and per-layer ratios;
  # a probabilistic preconditioner its lr, α, w, λ, phase and singular values.
  values.update(transforms.ratio_lr_values(opt_state))
  values.update(transforms.preconditioner_log(opt_state))
  return values


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
) -> Callable[..., tuple[TrainState, PackedValues]]:
  """Builds the pure train step ``step(state, x, y, measure=True) -> (state, values)``.

  ``values`` (a read-only mapping held as one array per dtype and shape,
  :class:`jaxscope.packed.PackedValues`) holds ``loss`` (mean over the batch),
  ``train/accuracy`` (classification),
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
  only at steps ``t ≥ 1`` with ``(t − 1) % every == 0`` (per-example statistics and
  BatchNorm or dropout: see the module docstring).

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
      plateau (:func:`jaxscope.models.growth.growth_update`; the key ``init``, added by
      :func:`jaxscope.train.setup`, is the model's ``kernel_init`` for ``reinit``);
      ``values`` gets ``capacity/active/{layer}``, ``capacity/frozen/{layer}``,
      ``capacity/expanded``.
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
    g = _gradients(state, losses_fn, x, y, instruments, hvp=hvp, phase=phase)
    extra = dict(g.extra)
    if monitored:
      extra["measure"] = measure
    if capacity is not None:
      extra["trainable"] = growth.trainable(
        state.params,
        state.model_state["capacity"],
        state.instruments["growth"],
        keep=capacity.get("keep", "bias"),
      )
    updates, opt_state = tx.update(g.grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    values = _step_values(g, task, schedule, state.step, opt_state)
    inst_state = state.instruments
    if instruments is not None and g.probe is not None:
      lr = values.get("lr", learning_rate)
      ivals, inst_state = _instrument_values(
        state, instruments, activation_scope, g.probe, updates, lr=lr, measure=measure
      )
      values.update(ivals)
    if monitored and measure:
      values.update(
        {k: v for k, v in transforms.monitored_metrics(opt_state).items() if k != MEASURED},
      )
    model_state = {**state.model_state, **g.new_model_state}
    if capacity is not None:
      params, cap_vars, gstate, gvals = _grow(state, model, capacity, g, params, x, rng=rng)
      model_state = {**model_state, "capacity": cap_vars}
      inst_state = {**(inst_state or {}), "growth": gstate}
      values.update(gvals)
    new_state = TrainState(
      optax.safe_increment(state.step), params, model_state, opt_state, inst_state
    )
    # One array per dtype and shape: the step returns a few leaves, not one per value.
    return new_state, PackedValues.pack({k: _at_least_float32(v) for k, v in values.items()})

  return step


class _Gradients(NamedTuple):
  """The loss and gradient of one step, and what the optimizer and instruments need."""

  loss: jax.Array
  aux: dict[str, jax.Array]
  new_model_state: Any
  grads: Any
  probe: Any
  """The instruments' probe (:meth:`~jaxscope.metrics.Instruments.grad`), or ``None``."""
  extra: dict[str, Any]
  """Extra arguments of ``tx.update``: ``hvp_fn`` and ``phase`` for a preconditioner."""


def _gradients(
  state: TrainState,
  losses_fn: Callable[..., Any],
  x: jax.Array,
  y: jax.Array,
  instruments: Instruments | None,
  *,
  hvp: bool,
  phase: int | None,
) -> _Gradients:
  """The mean loss and its gradient: through the instruments' probe when there are
  instruments (the same mean loss and gradient), with the Hessian-vector product of the
  same minibatch loss when the optimizer needs one (build and apply phases skip it)."""

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
    if need_hvp:  # The same linearisation as below; the probe gave the value and gradient.
      _, _, extra["hvp_fn"] = transforms.value_grad_and_hvp(loss_fn, state.params, has_aux=True)
  elif need_hvp:
    (loss, (aux, new_model_state)), grads, extra["hvp_fn"] = transforms.value_grad_and_hvp(
      loss_fn, state.params, has_aux=True
    )
  else:
    (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return _Gradients(loss, aux, new_model_state, grads, probe, extra)


def _instrument_values(
  state: TrainState,
  instruments: Instruments,
  activation_scope: Scope | None,
  probe: Any,
  updates: Any,
  *,
  lr: Any,
  measure: bool,
) -> tuple[dict[str, jax.Array], Any]:
  """Cockpit's values of the step (without their ``loss``; ``alpha`` on every step) and
  the activation health of the captured layers, with the instruments' new state."""
  values: dict[str, jax.Array] = {}
  istate = _unpack(state.instruments["cockpit"])
  ivals, istate = instruments.update(istate, probe, updates, learning_rate=lr)
  inst_state = {**state.instruments, "cockpit": _pack(istate)}
  if measure:
    values.update({k: v for k, v in ivals.items() if k not in ("loss", MEASURED)})
  elif "alpha" in ivals:
    values["alpha"] = ivals["alpha"]
  captured = probe.captured
  if activation_scope is not None and "activations" in state.instruments and captured is not None:
    avals, inst_state["activations"] = activation_scope.update(
      state.instruments["activations"],
      activations=dict(captured.outputs),
      layer_grads=dict(captured.grads),
      measure=bool(measure),
    )
    if measure:
      values.update({k: v for k, v in avals.items() if k != MEASURED})
  return values, inst_state


def _grow(
  state: TrainState,
  model: Any,
  capacity: Mapping[str, Any],
  g: _Gradients,
  params: Any,
  x: jax.Array,
  *,
  rng: jax.Array,
) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
  """Dynamic capacity after the update: the loss folded into the plateau rule, and on a
  plateau growth, freezing and re-initialisation
  (:func:`jaxscope.models.growth.growth_update`). Returns the parameters, the capacity
  variables, the growth state and their values."""
  cap_vars = state.model_state["capacity"]
  act_std = None
  if capacity["policy"] == "activation-std":
    if g.probe is not None and g.probe.captured is not None:
      outputs = dict(g.probe.captured.outputs)
    else:  # One extra forward pass records the layers' outputs.
      with capture.intercept() as rec:
        model.apply({"params": state.params, **state.model_state}, x, train=True, rng=rng)
      outputs = dict(rec.outputs)
    act_std = growth.activation_std(outputs, state.params, cap_vars)
  params, cap_vars, gstate = growth.growth_update(
    state.instruments["growth"],
    value=g.loss,
    params=params,
    capacity=cap_vars,
    key=jax.random.fold_in(rng, 1),
    policy=capacity["policy"],
    activation_std=act_std,
    patience=capacity["patience"],
    cooldown=capacity["cooldown"],
    min_delta=capacity["min_delta"],
    smoothing=capacity["smoothing"],
    reinit=capacity.get("reinit", True),
    reset=capacity.get("reset", True),
    init=capacity.get("init"),
  )
  return params, cap_vars, gstate, growth.growth_values(gstate, cap_vars)
