"""The instruments' state, the probe passed from ``grad`` to ``update``, and ``init``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxscope.metrics import curvature, noise
from jaxscope.metrics.instruments.config import F32, Config, value_specs
from jaxscope.packed import PackedValues

__all__ = ["Instruments", "InstrumentsState", "Probe", "init"]


class InstrumentsState(NamedTuple):
  """State of :func:`instruments`; fixed structure from ``init`` on."""

  count: jax.Array
  """``int32``: steps seen."""
  key: jax.Array
  """PRNG key for Hutchinson probes."""
  measured: jax.Array
  """``bool``: whether ``values`` were measured at the last step."""
  values: PackedValues
  """The latest values, packed as one array per dtype and shape."""
  init_params: Any
  """The parameters at ``init`` (for ``distance``), else ``()``."""
  prev_update: Any
  """The update of the last α start point (for ``alpha``), else ``()``."""
  alpha_start: jax.Array
  """``float32[7]``: ``t, f, var f, f', var f', valid`` at the last α start point, and the
  span route's mode (:data:`~jaxscope.metrics.instruments.update.SPAN_UNTESTED`,
  ``SPAN_VERIFIED`` or ``SPAN_FAILED``)."""
  max_ev: Any
  """:class:`~jaxscope.metrics.curvature.MaxEigState` (for ``hess_max_ev``), else ``()``."""
  diag_ema: Any
  """Moving average of the Hutchinson Hessian diagonal (for ``tic_diag``), else ``()``."""
  diag_steps: jax.Array
  """``int32``: measured steps in ``diag_ema``."""
  diag_var_ema: Any
  """Moving sum of the per-step variances of the diagonal estimates (for ``tic_diag``'s
  standard error), else ``()``."""


class Probe(NamedTuple):
  """What :meth:`Instruments.grad` measured; pass it to :meth:`Instruments.update`.

  Holds the loss function and batch, so use it inside the same traced function.
  """

  loss: jax.Array
  losses: jax.Array
  grads: Any
  aux: Any
  captured: Any
  """The captured layers' outputs and output gradients, a
  :class:`~jaxscope.capture.Captured` without ``inputs`` (zeros on unmeasured steps;
  ``None`` with ``capture_layers=False``): feed ``captured.outputs`` and
  ``captured.grads`` to a scope's ``activations=`` and ``layer_grads=``."""
  values: dict[str, jax.Array]
  measured: jax.Array
  key: jax.Array
  max_ev: Any
  diag_ema: Any
  diag_steps: jax.Array
  diag_var_ema: Any
  dense: tuple[noise.DenseLayer, ...]
  """The captured Dense layers (empty when none or not measured)."""
  convs: tuple[noise.ConvLayer, ...]
  """The captured convolutions with their per-example gradients."""
  sq_norms: jax.Array
  """``[B]`` per-example squared gradient norms (zeros when not measured)."""
  params: Any
  args: tuple[Any, ...]
  losses_fn: Callable[..., Any]
  has_aux: bool


class Instruments(NamedTuple):
  """The pure functions of :func:`instruments` (see the module docstring)."""

  init: Callable[..., InstrumentsState]
  grad: Callable[..., Probe]
  update: Callable[..., tuple[PackedValues, InstrumentsState]]
  quantities: tuple[str, ...]
  every: int


def init(cfg: Config, params: Any) -> InstrumentsState:
  """The initial state; ``params`` fixes the structure (and ``distance``'s origin)."""
  specs = value_specs(cfg, params)
  values = {k: jnp.zeros(v.shape, v.dtype) for k, v in specs.items()}
  if "alpha" in values:  # No update yet: α does not exist (0 is a legitimate α).
    values["alpha"] = jnp.full((), jnp.nan, F32)
  key = jax.random.key(cfg.seed)
  key, ev_key = jax.random.split(key)
  want = cfg.want
  return InstrumentsState(
    count=jnp.zeros((), jnp.int32),
    key=key,
    measured=jnp.zeros((), jnp.bool_),
    values=PackedValues.pack(values),
    init_params=jax.tree.map(jnp.array, params) if "distance" in want else (),
    prev_update=jax.tree.map(jnp.zeros_like, params) if cfg.need_alpha else (),
    alpha_start=jnp.zeros((7,), F32).at[5].set(-1.0),  # No start point yet; span untested.
    max_ev=curvature.max_eigenvalue_init(params, ev_key) if "hess_max_ev" in want else (),
    diag_ema=jax.tree.map(jnp.zeros_like, params) if cfg.use_ema(params) else (),
    diag_var_ema=jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params)
    if cfg.use_ema(params)
    else (),
    diag_steps=jnp.zeros((), jnp.int32),
  )
