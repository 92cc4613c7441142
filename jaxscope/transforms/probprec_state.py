"""The state of :func:`jaxscope.transforms.probabilistic_preconditioner`.

Its nine scalars are packed into two arrays (``counters`` and ``groups``) and read under
their own names: a training loop donates the state to its jitted step, and each small
donated buffer costs that step (measured in ``PreconditionerState``'s docstring).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["PreconditionerState"]

#: The scalars packed into ``PreconditionerState.counters`` and ``.groups``, in order.
_COUNTERS = ("count", "step", "cycle", "phase")
_GROUPS = ("alpha", "w", "lam", "lr", "last_alpha")


class PreconditionerState(NamedTuple):
  """State of :func:`probabilistic_preconditioner`; its structure is fixed by ``init``.

  Per-leaf buffers are trees with the structure of the parameters; each leaf is
  flattened to a vector of ``N_p`` entries and its columns stored as rows (``S``, ``Y``,
  ``X``: ``[M, N_p]``; ``U``: ``[k_p, N_p]``, one singular vector per row, with
  ``k_p = min(est_rank, N_p − 1)``), which keeps every product a plain matrix product
  without transposes of ``N``-sized buffers.

  The scalars are packed into two arrays, ``counters`` (``count, step, cycle, phase``) and
  ``groups`` (``alpha, w, lam, lr, last_alpha``), and read as attributes of those names
  (``state.alpha``); :meth:`replace` sets them. A training loop donates the state to its
  jitted step, and each small donated buffer costs the step: carrying the nine scalars as
  leaves of their own made an apply step on the MNIST MLP 3 % slower than SGD's, packed
  0.1–0.7 % (``benchmarks/preconditioner.py``).
  """

  counters: jax.Array
  """``int32[4]``: ``count``, ``step``, ``cycle``, ``phase`` (see those attributes)."""
  sum_v: Any
  """Per leaf ``[N_p]``: the sum of the prior probes ``v``."""
  sum_h: Any
  """Per leaf ``[N_p]``: the sum of their products ``h``; ``()`` without
  ``estimate_hessian``."""
  abc: Any
  """``[L, 3]``, a row per leaf: ``[a, b, c] = [Σ‖v‖², Σ⟨v, h⟩, Σ‖h‖²]``."""
  S: Any
  Y: Any
  X: Any
  rho2: Any
  """Per leaf ``[M]``: squared norms ``ρ_i²`` of the un-normalised directions. ``S``, ``Y``,
  ``X`` and ``rho2`` are ``()`` without ``estimate_hessian``."""
  U: Any
  sigma: Any
  """Per leaf ``[k_p]``: the singular values of ``B̂`` kept (0: dropped). ``U`` and
  ``sigma`` are ``()`` without ``estimate_hessian``."""
  groups: jax.Array
  """``[5, G]``: ``alpha``, ``w``, ``lam``, ``lr``, ``last_alpha`` per group (see those
  attributes)."""
  trace: Any
  """The momentum buffer (parameter-shaped), reset every cycle; ``()`` with momentum 0."""
  grad_norm: jax.Array | tuple[()]
  """Global L2 norm of the gradient of the latest update (preconditioned in phase D), with
  ``log_grad_norm=True``; else ``()``."""

  @property
  def count(self) -> jax.Array:
    """``int32`` updates seen in total."""
    return self.counters[0]

  @property
  def step(self) -> jax.Array:
    """``int32`` steps since the current estimation cycle started (``k``)."""
    return self.counters[1]

  @property
  def cycle(self) -> jax.Array:
    """``int32`` index of the current cycle (0 for the first)."""
    return self.counters[2]

  @property
  def phase(self) -> jax.Array:
    """``int32`` phase of the latest update (index into :data:`~jaxscope.transforms.PHASES`)."""
    return self.counters[3]

  @property
  def alpha(self) -> jax.Array:
    """``[G]`` step size / inverse prior mean per group."""
    return self.groups[0]

  @property
  def w(self) -> jax.Array:
    """``[G]`` prior scale per group."""
    return self.groups[1]

  @property
  def lam(self) -> jax.Array:
    """``[G]`` noise scale per group."""
    return self.groups[2]

  @property
  def lr(self) -> jax.Array:
    """``[G]`` learning rate in use per group (0 during estimation)."""
    return self.groups[3]

  @property
  def last_alpha(self) -> jax.Array:
    """``[G]`` the latest valid ``α`` (0 before any), the fallback of ``faithful=False``."""
    return self.groups[4]

  def replace(self, **fields: Any) -> PreconditionerState:
    """``_replace`` that also takes the packed scalars by name (``count=``, ``alpha=``, …).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxscope.transforms import only_adaptive_sgd
      >>> s = only_adaptive_sgd().init({"w": jnp.zeros(3)})
      >>> s = s.replace(alpha=jnp.array([0.5]), count=jnp.array(7, jnp.int32))
      >>> float(s.alpha[0]), int(s.count), s.counters.shape, s.groups.shape
      (0.5, 7, (4,), (5, 1))
    """
    for packed, names in (("counters", _COUNTERS), ("groups", _GROUPS)):
      given = {k: fields.pop(k) for k in names if k in fields}
      if given:
        old = getattr(self, packed)
        fields[packed] = jnp.stack(
          [jnp.asarray(given.get(k, old[i])).astype(old.dtype) for i, k in enumerate(names)]
        )
    return self._replace(**fields)
