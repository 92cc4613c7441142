"""The state of :func:`jaxscope.transforms.probabilistic_preconditioner`.

Its nine scalars are packed into two arrays (``counters`` and ``groups``) and its per-leaf
vectors ``rho2`` and ``sigma`` into one array of rows each, all read under their own
names: a training loop donates the state to its jitted step, and each small donated
buffer costs that step (measured in ``PreconditionerState``'s docstring).
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
  (``state.alpha``); the per-leaf vectors ``rho2`` and ``sigma`` into one array of rows
  each, read as trees with the parameters' structure; :meth:`replace` sets them all. A
  training loop donates the state to its jitted step, and each small donated buffer costs
  the step: carrying the nine scalars as leaves of their own made an apply step on the
  MNIST MLP 3 % slower than SGD's, packed 0.1–0.7 % (``benchmarks/preconditioner.py``).
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
  rho2_rows: jax.Array | tuple[()]
  """``[L, M]``, a row per leaf: the packed ``rho2`` (see that attribute). ``S``, ``Y``,
  ``X`` and ``rho2_rows`` are ``()`` without ``estimate_hessian``."""
  U: Any
  sigma_rows: jax.Array | tuple[()]
  """``[L, max k_p]``, a row per leaf: the packed ``sigma`` (see that attribute), zero
  beyond the leaf's ``k_p``. ``U`` and ``sigma_rows`` are ``()`` without
  ``estimate_hessian``."""
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

  @property
  def rho2(self) -> Any:
    """Per leaf ``[M]``: squared norms ``ρ_i²`` of the un-normalised directions (a tree with
    the parameters' structure; ``()`` without ``estimate_hessian``)."""
    if isinstance(self.rho2_rows, tuple):
      return ()
    treedef = jax.tree_util.tree_structure(self.S)
    return treedef.unflatten(list(self.rho2_rows))

  @property
  def sigma(self) -> Any:
    """Per leaf ``[k_p]``: the singular values of ``B̂`` kept (0: dropped), a tree with the
    parameters' structure; ``()`` without ``estimate_hessian``."""
    if isinstance(self.sigma_rows, tuple):
      return ()
    leaves, treedef = jax.tree_util.tree_flatten(self.U)
    rows = list(self.sigma_rows)
    return treedef.unflatten([r[: u.shape[0]] for r, u in zip(rows, leaves, strict=True)])

  def replace(self, **fields: Any) -> PreconditionerState:
    """``_replace`` that also takes the packed values by name (``count=``, ``alpha=``,
    ``rho2=``, ``sigma=``, …).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxscope.transforms import only_adaptive_sgd
      >>> s = only_adaptive_sgd().init({"w": jnp.zeros(3)})
      >>> s = s.replace(alpha=jnp.array([0.5]), count=jnp.array(7, jnp.int32))
      >>> float(s.alpha[0]), int(s.count), s.counters.shape, s.groups.shape
      (0.5, 7, (4,), (5, 1))
    """
    for name in ("rho2", "sigma"):
      if name in fields:
        fields[f"{name}_rows"] = _rows(fields.pop(name), getattr(self, f"{name}_rows"))
    for packed, names in (("counters", _COUNTERS), ("groups", _GROUPS)):
      given = {k: fields.pop(k) for k in names if k in fields}
      if given:
        old = getattr(self, packed)
        fields[packed] = jnp.stack(
          [jnp.asarray(given.get(k, old[i])).astype(old.dtype) for i, k in enumerate(names)]
        )
    return self._replace(**fields)


def _rows(tree: Any, like: jax.Array | tuple[()]) -> jax.Array | tuple[()]:
  """The per-leaf vectors of ``tree`` as the rows of an array shaped and typed as ``like``
  (each zero-padded to its width)."""
  if isinstance(like, tuple):
    return ()
  width = like.shape[1]
  rows = [jnp.pad(v.astype(like.dtype), (0, width - v.shape[0])) for v in jax.tree.leaves(tree)]
  return jnp.stack(rows) if rows else like
