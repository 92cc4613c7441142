"""What a run is built from: :func:`setup` turns a :class:`~jaxscope.run.TrainConfig` into
a :class:`Setup`, the model, the dataset, the optimizer, the metrics and the initial
state that :func:`~jaxscope.train.loop.train` (or a loop of your own) steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxscope import xla
from jaxscope.metrics.instruments import HUTCHINSON_QUANTITIES, Instruments
from jaxscope.metrics.scope import Scope
from jaxscope.models import growth
from jaxscope.run import TrainConfig, check_config
from jaxscope.run.config import parse_capacity, parse_mesh
from jaxscope.train import sharding
from jaxscope.train.measure import (
  make_activation_scope,
  make_instruments,
  make_scope,
  stacked_of,
)
from jaxscope.train.optim import HVP_OPTIMIZERS, Optimizer, build_optimizer, updates_in_span
from jaxscope.train.step import TrainState, init_instruments, make_train_step

__all__ = ["Setup", "setup"]


class Setup(NamedTuple):
  """What a run is built from (:func:`setup`): its data, model, optimizer and measurements."""

  config: TrainConfig
  dataset: Any
  task: str
  model: Any
  optimizer: Optimizer
  scope: Scope | None
  instruments: Instruments | None
  activation_scope: Scope | None
  capacity: dict[str, Any] | None
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh | None = None
  """The device mesh of ``config.mesh`` (:func:`jaxscope.train.sharding.make_mesh`), or
  ``None``: one device."""

  def init_state(self) -> TrainState:
    """The initial train state (jittable): parameters from ``key(seed)`` (floating leaves
    cast to ``config.param_dtype``), the optimizer's, instruments' and growth states."""
    c, ds = self.config, self.dataset
    variables = self.model.init(jax.random.key(c.seed), jnp.asarray(ds.train_x[:1]))
    params = _cast_floats(variables["params"], jnp.dtype(c.param_dtype))
    model_state = {k: v for k, v in variables.items() if k != "params"}
    inst_state: Any = ()
    if self.instruments is not None:
      batch_shapes = tuple(  # A training batch's shapes, to size the captured layers.
        jax.ShapeDtypeStruct((c.batch_size, *a.shape[1:]), jax.dtypes.canonicalize_dtype(a.dtype))
        for a in (ds.train_x, ds.train_y)
      )
      inst_state = init_instruments(
        self.model,
        self.instruments,
        params,
        model_state,
        *batch_shapes,
        task=self.task,
        activation_scope=self.activation_scope,
      )
    if self.capacity is not None:
      inst_state = {
        **(inst_state or {}),
        "growth": growth.growth_init(
          params, model_state["capacity"], cooldown=self.capacity["cooldown"]
        ),
      }
    return TrainState(
      jnp.zeros((), jnp.int32), params, model_state, self.optimizer.tx.init(params), inst_state
    )

  def state_shardings(self) -> Any:
    """The shardings of the train state on :attr:`mesh`
    (:func:`jaxscope.train.sharding.state_shardings`), ``None`` without a mesh."""
    if self.mesh is None:
      return None
    return sharding.state_shardings(self.mesh, jax.eval_shape(self.init_state))

  def initial_state(self) -> TrainState:
    """:meth:`init_state` computed on the device(s), each leaf created in its layout."""
    if self.mesh is None:
      return jax.jit(self.init_state)()
    return jax.jit(self.init_state, out_shardings=self.state_shardings())()

  def xla_options(self) -> list[str]:
    """The names of the XLA:CPU options the step is compiled with: ``config.xla_options``,
    where ``None`` or ``["auto"]`` is :func:`jaxscope.xla.step_options` for this model and
    these instruments, and ``["none"]`` is none (XLA's own)."""
    names = list(self.config.xla_options or ["auto"])
    if names == ["none"]:
      return []
    if names != ["auto"]:
      return names
    ds = self.dataset
    x = jax.ShapeDtypeStruct((1, *ds.train_x.shape[1:]), jnp.asarray(ds.train_x[:1]).dtype)
    quantities = set(self.instruments.quantities) if self.instruments is not None else set()
    return xla.step_options(
      convolutional=xla.has_convolution(self.model.init, jax.random.key(0), x),
      hessian_sums=bool(quantities & HUTCHINSON_QUANTITIES),
      platform=jax.default_backend(),
    )

  def train_step(
    self, xla_options: list[str] | None = None
  ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step (``measure`` and ``phase`` static, the state donated), compiled with
    ``xla_options`` (default :meth:`xla_options`); on a mesh the new state keeps the
    state's shardings and the values are replicated."""
    c = self.config
    layout = {}
    if self.mesh is not None:
      layout["out_shardings"] = (self.state_shardings(), sharding.replicated(self.mesh))
    return jax.jit(
      make_train_step(
        self.model,
        self.optimizer.tx,
        task=self.task,
        schedule=self.optimizer.schedule,
        seed=c.seed,
        monitored=self.scope is not None,
        hvp=c.optimizer in HVP_OPTIMIZERS,
        instruments=self.instruments,
        activation_scope=self.activation_scope,
        learning_rate=c.lr,
        capacity=self.capacity,
      ),
      static_argnames=("measure", "phase"),
      donate_argnums=0,
      compiler_options=xla.compiler_options(
        self.xla_options() if xla_options is None else xla_options
      ),
      **layout,
    )


def _cast_floats(tree: Any, dtype: Any) -> Any:
  """``tree`` with its floating leaves of another type cast to ``dtype`` (others as they are)."""

  def cast(a: Any) -> Any:
    floating = jnp.issubdtype(a.dtype, jnp.floating)
    return a.astype(dtype) if floating and a.dtype != dtype else a

  return jax.tree.map(cast, tree)


def _build_model(
  config: TrainConfig, input_shape: tuple[int, ...], num_classes: int, **kw: Any
) -> Any:
  """The zoo model of ``config`` (``dtype`` passed as the builder's ``dtype=``)."""
  from jaxscope import models as jmodels

  if "param_dtype" in kw and str(kw["param_dtype"]) != config.param_dtype:
    raise ValueError(
      f"train: model_args param_dtype={kw['param_dtype']!r} disagrees with param_dtype="
      f"{config.param_dtype!r}, to which the initial parameters are cast; give param_dtype "
      "(--param-dtype) instead."
    )
  if config.dtype is not None:
    if "dtype" in kw and kw["dtype"] != config.dtype:
      raise ValueError(
        f"train: dtype={config.dtype!r} and model_args dtype={kw['dtype']!r} disagree; "
        "give one of them."
      )
    kw["dtype"] = config.dtype
  try:
    return jmodels.build(config.model, input_shape, num_classes, **kw)
  except TypeError as e:
    if config.dtype is None or "dtype" not in str(e):
      raise
    raise ValueError(
      f"train: dtype={config.dtype!r} needs a model whose builder takes dtype=; model "
      f"{config.model!r} does not ({e}). Leave dtype unset (the model computes in its own "
      "type), or use a model that takes it (e.g. the transformers)."
    ) from None


def setup(config: TrainConfig) -> Setup:
  """Loads the dataset and builds the model, optimizer and measurements of ``config``.

  The split is the dataset's own (seed via ``data_args``); the run's seed varies the
  initialisation and the data order. The multi-process runtime is started first when the
  launch environment asks for it (:func:`jaxscope.train.sharding.initialize_distributed`);
  with ``config.mesh`` the mesh is built over every device of every process, and the
  returned config holds it as a dict (:func:`jaxscope.run.config.parse_mesh`).

  Raises:
    ValueError: a configuration no run can take (named field and value).
  """
  from jaxscope import data as jdata

  check_config(config)
  config = dataclasses.replace(config, mesh=parse_mesh(config.mesh))
  if sharding.initialize_distributed() and config.mesh is None and jax.process_count() > 1:
    raise ValueError(
      f"train: {jax.process_count()} processes were launched but mesh is not set; give "
      "--mesh (e.g. data=N over the N devices of all processes)."
    )
  mesh = sharding.make_mesh(config.mesh) if config.mesh is not None else None
  ds = jdata.load(config.dataset, config.data_dir, **config.data_args)
  task = getattr(ds, "task", "classification")
  n_train = len(ds.train_x)
  if n_train < config.batch_size:
    raise ValueError(
      f"train: batch_size {config.batch_size} is larger than the {n_train} training examples."
    )
  steps_per_epoch = n_train // config.batch_size
  total = config.steps if config.steps is not None else config.epochs * steps_per_epoch  # type: ignore[operator]
  capacity = parse_capacity(config.capacity) if config.capacity else None
  model_args = dict(config.model_args)
  if capacity is not None:
    if not config.model.startswith("capacity_"):
      raise ValueError(
        f"train: --capacity needs a model with capacity layers (capacity_mlp, capacity_cnn), "
        f"got {config.model!r}."
      )
    if config.optimizer in HVP_OPTIMIZERS:
      raise ValueError(f"train: --capacity cannot be combined with {config.optimizer!r}.")
    model_args.setdefault("chunks", capacity["chunks"])
    # A re-drawn chunk uses the model's initialiser (the zoo's default: LeCun normal).
    capacity = {**capacity, "init": model_args.get("kernel_init", "lecun_normal")}
  model = _build_model(config, tuple(ds.train_x.shape[1:]), ds.num_classes, **model_args)
  stacked = stacked_of(model)  # Layer-stacked (scanned) models are measured per layer.
  sc = make_scope(
    config.metrics,
    topics=config.topics,
    layers=config.layers,
    exclude=config.exclude,
    depth=config.depth,
    kind=config.kind,
    every=config.every,
    stacked=stacked,
    low_precision=jnp.dtype(config.param_dtype).itemsize < 4,
  )
  opt = build_optimizer(
    config,
    steps_per_epoch=steps_per_epoch,
    total_steps=total,
    scope=sc,
    capacity=capacity is not None,
  )
  inst = make_instruments(
    config.metrics,
    every=config.every,
    seed=config.seed,
    updates_in_span=updates_in_span(config, capacity=capacity is not None),
  )
  act_scope = make_activation_scope(config.every, stacked=stacked) if inst is not None else None
  return Setup(
    config, ds, task, model, opt, sc, inst, act_scope, capacity, steps_per_epoch, total, mesh
  )
