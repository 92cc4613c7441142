"""Chunk arithmetic of capacity models: active units, the layer graph, trainable entries.

A capacity layer (:mod:`jaxscope.models.capacity`) of maximum width ``features`` is split
into ``chunks`` equal chunks of ``s = features / chunks`` units; unit ``j`` is active iff
``floor(j / s) < active`` (:func:`unit_mask`). On an error plateau a controller raises
``active`` by one, re-initialises the new chunk (:func:`reinit_chunk`) and freezes the chunks
trained so far (:func:`trainable_mask`). Both work on a model's ``params`` and ``capacity``
collections, in which :func:`capacity_layers` finds the capacity layers.

Layer graph used by :func:`trainable_mask` and :func:`reinit_chunk` (derived from the
``params`` and ``capacity`` trees alone):

* Layers are ordered by the natural sort of their module paths (digit runs compared as
  integers: ``CapacityDense_2 < CapacityDense_10``). A jitted ``init`` returns dicts with
  sorted keys, so the creation order is not available; Flax's automatic names
  (``CapacityConv_0, CapacityConv_1, CapacityDense_0, Dense_0``) and the zoo's names sort in
  call order. Name layers so that they do.
* A capacity layer's *consumer* is the next layer in that order whose kernel input dimension
  (``kernel.shape[-2]``) equals the capacity layer's ``features`` ``C`` (Dense after Dense,
  conv after conv, Dense after global pooling), or — for a 2-D (Dense) kernel after a
  convolutional capacity layer — is a multiple of ``C`` (a channels-last flatten: input row
  ``r`` reads channel ``r mod C``). Layers in between that match neither are skipped
  (e.g. an unrelated stem); a non-capacity layer that consumes ends the chain.
* A :class:`~jaxscope.models.capacity.CapacityResidualBlock` is one capacity layer whose
  sub-layers ``conv1`` and ``proj`` read the block's input (they consume the previous
  capacity layer) and whose ``conv2`` reads the block's own units.

Only sequential stacks of such layers are analysed; branches, concatenations or layers with
several kernels (other than ``CapacityResidualBlock``) are not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxscope.tree import path_name

__all__ = [
  "INITIALIZERS",
  "KEEP",
  "CapacityInfo",
  "capacity_layers",
  "initializer",
  "reinit_chunk",
  "trainable_mask",
  "unit_mask",
]

Initializer = Callable[..., jax.Array]

_LECUN_NORMAL = nn.initializers.lecun_normal()

#: Initialisers by name (factories of :mod:`jax.nn.initializers`), for the capacity layers,
#: the zoo's capacity models and the command line (``--model-args kernel_init=glorot_uniform``).
#: ``glorot_*`` (alias ``xavier_*``): variance ``2 / (fan_in + fan_out)`` (Glorot & Bengio,
#: AISTATS 2010; TensorFlow's default for dense and convolutional layers); ``lecun_*``:
#: ``1 / fan_in`` (LeCun et al. 1998; Flax's default); ``he_*`` (alias ``kaiming_*``):
#: ``2 / fan_in`` (He et al., ICCV 2015). Fans are those of the full kernel shape: a capacity
#: layer draws its weights for its full width.
INITIALIZERS: dict[str, Callable[[], Initializer]] = {
  "glorot_uniform": nn.initializers.glorot_uniform,
  "glorot_normal": nn.initializers.glorot_normal,
  "xavier_uniform": nn.initializers.glorot_uniform,
  "xavier_normal": nn.initializers.glorot_normal,
  "lecun_normal": nn.initializers.lecun_normal,
  "lecun_uniform": nn.initializers.lecun_uniform,
  "he_normal": nn.initializers.he_normal,
  "he_uniform": nn.initializers.he_uniform,
  "kaiming_normal": nn.initializers.he_normal,
  "kaiming_uniform": nn.initializers.he_uniform,
  "zeros": nn.initializers.zeros_init,
  "ones": nn.initializers.ones_init,
}

#: What stays trainable after an expansion besides the new chunks (:func:`trainable_mask`).
KEEP = ("new", "bias", "output")


def initializer(spec: str | Initializer, *, what: str = "init") -> Initializer:
  """An initialiser from its name in :data:`INITIALIZERS`, or ``spec`` itself if callable.

  Args:
    spec: a name (``"glorot_uniform"``, ``"xavier_normal"``, ``"he_normal"``, …) or an
      initialiser ``init(key, shape, dtype)``.
    what: the argument's name for the error message.

  Raises:
    ValueError: an unknown name or something that is neither a name nor callable.

  >>> initializer("xavier_uniform")(jax.random.key(0), (2, 3)).shape
  (2, 3)
  """
  if isinstance(spec, str):
    if spec not in INITIALIZERS:
      raise ValueError(
        f"{what} must be one of {sorted(INITIALIZERS)} or an initialiser function, got {spec!r}."
      )
    return INITIALIZERS[spec]()
  if not callable(spec):
    raise ValueError(
      f"{what} must be one of {sorted(INITIALIZERS)} or an initialiser function, got {spec!r}."
    )
  return spec


# The sub-layer of a CapacityResidualBlock that reads the block's own units.
_BLOCK_INNER = "conv2"


# --------------------------------------------------------------------------- unit masks


def _check_chunks(
  where: str, features: int, chunks: int, initial_chunks: int | None = None
) -> None:
  if isinstance(features, bool) or not isinstance(features, int | np.integer) or features < 1:
    raise ValueError(f"{where}: features must be a positive integer, got {features!r}.")
  if isinstance(chunks, bool) or not isinstance(chunks, int | np.integer) or chunks < 1:
    raise ValueError(f"{where}: chunks must be a positive integer, got {chunks!r}.")
  if features % chunks:
    raise ValueError(
      f"{where}: features={features} is not divisible by chunks={chunks}; the width must split "
      "into equal chunks."
    )
  if initial_chunks is not None and not (
    isinstance(initial_chunks, int | np.integer) and 0 <= initial_chunks <= chunks
  ):
    raise ValueError(
      f"{where}: initial_chunks must be an integer in [0, chunks={chunks}], got {initial_chunks!r}."
    )


def _chunk_index(features: int, chunks: int | jax.Array) -> jax.Array:
  """``floor(j / (features / chunks))`` for ``j = 0 … features-1`` (``int32``)."""
  return jnp.arange(features, dtype=jnp.int32) // (features // jnp.asarray(chunks, jnp.int32))


def unit_mask(active: jax.Array, features: int, chunks: int | jax.Array) -> jax.Array:
  """Returns the boolean mask of active units of a capacity layer.

  ``mask_j = floor(j / s) < active`` with chunk size ``s = features / chunks``, for
  ``j = 0 … features-1``: the first ``active · s`` units.

  Args:
    active: number of active chunks (an ``int`` or ``int32`` scalar array, may be traced).
    features: the layer's maximum width (static).
    chunks: the number of equal chunks (static ``int``, or a traced scalar as read from the
      ``capacity`` collection inside ``jit``).

  Returns:
    ``bool[features]``.

  Raises:
    ValueError: if a static ``chunks`` does not divide ``features`` (naming both).

  >>> unit_mask(2, 6, 3)
  Array([ True,  True,  True,  True, False, False], dtype=bool)
  """
  if not isinstance(chunks, jax.Array):
    _check_chunks("unit_mask", features, chunks)
  return _chunk_index(features, chunks) < jnp.asarray(active, jnp.int32)


# --------------------------------------------------------------------------- the layer graph


class CapacityInfo(NamedTuple):
  """One capacity layer, as found by :func:`capacity_layers`."""

  key: str
  """The module path, ``/``-joined (``"CapacityDense_0"``, ``"Block_1"``)."""
  features: int
  """Maximum width: the last axis of the layer's kernel(s)."""
  chunks: int | jax.Array
  """Number of chunks: a Python ``int`` when ``capacity`` is concrete, the traced ``int32``
  scalar inside ``jit``."""


class _Edge(NamedTuple):
  """How one kernel connects to the capacity layers."""

  owner: str | None  # capacity layer whose units are the kernel's output columns
  provider: str | None  # capacity layer whose units the kernel's input rows read
  flatten: bool  # rows read channel r mod C of a flattened convolutional provider


def _natural(name: str) -> tuple:
  """Sort key: per ``/`` component, text compared as text and digit runs as integers."""
  return tuple(
    tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", part)))
    for part in name.split("/")
  )


def _module_of(name: str) -> str:
  return name.rpartition("/")[0]


def _owner(module: str, keys: Sequence[str]) -> str | None:
  """The capacity layer that is ``module`` or contains it (the longest matching path)."""
  best = None
  for key in keys:
    if (module == key or module.startswith(key + "/")) and (best is None or len(key) > len(best)):
      best = key
  return best


def _leaves(tree: Any, argname: str) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not flat:
    raise ValueError(f"{argname} is empty.")
  return [(path_name(p), leaf) for p, leaf in flat]


def _capacity_vars(capacity: Any) -> dict[str, dict[str, Any]]:
  out: dict[str, dict[str, Any]] = {}
  for name, leaf in _leaves(capacity, "capacity"):
    module, _, var = name.rpartition("/")
    out.setdefault(module, {})[var] = leaf
  found = {k: v for k, v in out.items() if "active" in v}
  if not found:
    raise ValueError(
      "capacity holds no '<layer path>/active' variables; pass variables['capacity'] of a model "
      "built from capacity layers."
    )
  for key, v in found.items():
    if "chunks" not in v:
      raise ValueError(f"capacity/{key} has 'active' but no 'chunks' variable.")
  return found


def _static_int(x: Any) -> int | jax.Array:
  """``int(x)`` for a concrete value, ``x`` itself when it is traced."""
  try:
    return int(np.asarray(x))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return x


def _analyse(
  params: Any, capacity: Any
) -> tuple[dict[str, CapacityInfo], dict[str, jax.Array], dict[str, bool], dict[str, _Edge]]:
  """Capacity layers, their ``active`` values, whether they are convolutional, kernel edges."""
  cap = _capacity_vars(capacity)
  keys = sorted(cap, key=_natural)
  leaves = _leaves(params, "params")
  kernels = sorted(
    ((n, leaf) for n, leaf in leaves if n.rpartition("/")[2] == "kernel" and np.ndim(leaf) >= 2),
    key=lambda t: _natural(t[0]),
  )
  infos: dict[str, CapacityInfo] = {}
  is_conv: dict[str, bool] = {}
  for key in keys:
    mine = [(n, leaf) for n, leaf in kernels if _owner(_module_of(n), keys) == key]
    if not mine:
      raise ValueError(
        f"capacity/{key} has no kernel in params (expected params['{key}']['kernel'] or, for a "
        "residual block, kernels below it)."
      )
    widths = {np.shape(leaf)[-1] for _, leaf in mine}
    if len(widths) != 1:
      raise ValueError(
        f"capacity layer {key!r}: its kernels {[n for n, _ in mine]} have different output widths "
        f"{sorted(widths)}."
      )
    features = widths.pop()
    chunks = _static_int(cap[key]["chunks"])
    if not isinstance(chunks, jax.Array):
      _check_chunks(f"capacity layer {key!r}", features, chunks)
    infos[key] = CapacityInfo(key, int(features), chunks)
    is_conv[key] = all(np.ndim(leaf) > 2 for _, leaf in mine)
  active = {k: jnp.asarray(cap[k]["active"], jnp.int32) for k in keys}

  # Group kernels into layers (a capacity layer, or one non-capacity module) in natural order.
  groups: list[tuple[str | None, list[tuple[str, Any]]]] = []
  for n, leaf in kernels:
    owner = _owner(_module_of(n), keys)
    if owner is not None and groups and groups[-1][0] == owner:
      groups[-1][1].append((n, leaf))
    else:
      groups.append((owner, [(n, leaf)]))

  edges: dict[str, _Edge] = {}
  pending: str | None = None
  for owner, members in groups:
    consumed = False
    for n, leaf in members:
      shape = np.shape(leaf)
      rel = _module_of(n)[len(owner) + 1 :] if owner is not None else ""
      if owner is not None and rel == _BLOCK_INNER:
        edges[n] = _Edge(owner, owner, False)
        continue
      provider, flatten = None, False
      if pending is not None:
        c = infos[pending].features
        if shape[-2] == c:
          provider = pending
        elif len(shape) == 2 and is_conv[pending] and shape[-2] % c == 0:
          provider, flatten = pending, True
      consumed |= provider is not None
      edges[n] = _Edge(owner, provider, flatten)
    if owner is not None:
      pending = owner
    elif consumed:
      pending = None
  return infos, active, is_conv, edges


def capacity_layers(params: Any, capacity: Any) -> dict[str, CapacityInfo]:
  """Finds the capacity layers of a model from its ``params`` and ``capacity`` collections.

  A capacity layer is a module path ``p`` with ``capacity[p]['active']`` and
  ``capacity[p]['chunks']``; its ``features`` is the last axis of the kernel(s) at or below
  ``params[p]`` (``kernel.shape[-1]``), its ``chunks`` the stored constant.

  Args:
    params: ``variables['params']``.
    capacity: ``variables['capacity']``.

  Returns:
    ``{key: CapacityInfo(key, features, chunks)}`` in layer order (natural sort of the paths,
    see the module docstring).

  Raises:
    ValueError: if ``capacity`` holds no capacity layer, a layer has no kernel, or a static
      ``chunks`` does not divide ``features``.
  """
  return _analyse(params, capacity)[0]


def _unit_state(
  info: CapacityInfo, active: jax.Array, frozen: jax.Array, n_rows: int | None, flatten: bool
) -> tuple[jax.Array, jax.Array]:
  """``(active_u, new_u)`` per unit (or per input row that reads a unit)."""
  chunk = _chunk_index(info.features, info.chunks)
  if n_rows is not None:
    channel = jnp.arange(n_rows) % info.features if flatten else jnp.arange(n_rows)
    chunk = chunk[channel]
  is_active = chunk < active
  return is_active, is_active & (chunk >= frozen)


def _frozen_values(frozen: Any, infos: dict[str, CapacityInfo]) -> dict[str, jax.Array]:
  frozen = dict(frozen or {})
  unknown = sorted(set(frozen) - set(infos))
  if unknown:
    raise ValueError(
      f"frozen names unknown capacity layer(s) {unknown}; the capacity layers are {list(infos)}."
    )
  return {k: jnp.asarray(frozen.get(k, 0), jnp.int32) for k in infos}


def trainable_mask(params: Any, capacity: Any, frozen: Any, *, keep: str = "bias") -> Any:
  """Which parameter entries may still change, given the active and frozen chunks.

  Per capacity layer ``l`` with chunk index ``c_l(j)`` of unit ``j``:
  ``active_l(j) = c_l(j) < active_l`` and ``new_l(j) = frozen_l <= c_l(j) < active_l``
  (``frozen_l`` = number of oldest chunks frozen, ``0`` if ``l`` is missing from ``frozen``).
  For a kernel entry connecting input row ``i`` to output unit ``j``:

      trainable(i, j) = (new_out(j) ∧ act_in(i)) ∨ (new_in(i) ∧ act_out(j))
                        ∨ (¬F ∧ act_in(i) ∧ act_out(j)),    F = ∃ l: frozen_l > 0,

  where ``new_out``/``act_out`` refer to the layer owning the kernel's output columns
  (``False``/``True`` if it is not a capacity layer) and ``new_in``/``act_in`` to the capacity
  layer the rows read (its consumer relation, see the module docstring; ``False``/``True``
  if the input is not capacity-managed; for a flatten after a convolution, row ``r`` reads
  channel ``r mod C``). Leading window axes of a conv kernel broadcast. Biases (and any
  other leaf of a capacity layer whose last axis has ``features`` entries):
  ``new_out(j) ∨ (¬F ∧ act_out(j))``; other leaves: ``¬F``.

  ``keep`` says what else stays trainable once something is frozen, in the layers that are
  *not* capacity layers (in the zoo's models: the output layer):

  * ``"new"``: nothing else (the rules above);
  * ``"bias"`` (default): their biases (leaves named ``bias``) stay trainable;
  * ``"output"``: all their parameters stay trainable: a kernel entry iff
    ``act_in(i) ∧ act_out(j)`` (rows that read an inactive unit stay excluded), other
    leaves always.

  Consequences: before any freezing (``F`` false) every active entry is trainable; inactive
  entries (reading or writing an inactive unit) never are; once something is frozen, an
  entry of a capacity layer is trainable iff it writes a new unit or reads one, and the
  layers that are not capacity layers keep what ``keep`` says.

  Args:
    params: ``variables['params']``.
    capacity: ``variables['capacity']`` (may be traced).
    frozen: ``{layer_key: int32 scalar}`` (may be traced), keys from :func:`capacity_layers`.
    keep: ``"new"``, ``"bias"`` or ``"output"`` (:data:`KEEP`).

  Returns:
    A pytree of ``bool`` arrays with the structure and shapes of ``params``. Jittable.

  Raises:
    ValueError: for a key of ``frozen`` that is not a capacity layer, or an unknown ``keep``.
  """
  if keep not in KEEP:
    raise ValueError(f"trainable_mask: keep must be one of {KEEP}, got {keep!r}.")
  infos, active, _, edges = _analyse(params, capacity)
  fro = _frozen_values(frozen, infos)
  any_frozen = jnp.any(jnp.stack([f > 0 for f in fro.values()]))
  keys = list(infos)

  def mask(path: Any, leaf: Any) -> jax.Array:
    name = path_name(path)
    shape = np.shape(leaf)
    edge = edges.get(name)
    if edge is not None:
      n_in, n_out = shape[-2], shape[-1]
      if edge.owner is not None:
        act_out, new_out = _unit_state(
          infos[edge.owner], active[edge.owner], fro[edge.owner], None, False
        )
      else:
        act_out, new_out = jnp.ones(n_out, bool), jnp.zeros(n_out, bool)
      if edge.provider is not None:
        p = edge.provider
        act_in, new_in = _unit_state(infos[p], active[p], fro[p], n_in, edge.flatten)
      else:
        act_in, new_in = jnp.ones(n_in, bool), jnp.zeros(n_in, bool)
      ai, ni = act_in[:, None], new_in[:, None]
      ao, no = act_out[None, :], new_out[None, :]
      kept = ~any_frozen | (keep == "output" and edge.owner is None)
      m = (no & ai) | (ni & ao) | (kept & ai & ao)
      return jnp.broadcast_to(m, shape)
    owner = _owner(_module_of(name), keys)
    if owner is not None and len(shape) >= 1 and shape[-1] == infos[owner].features:
      act_out, new_out = _unit_state(infos[owner], active[owner], fro[owner], None, False)
      return jnp.broadcast_to(new_out | (~any_frozen & act_out), shape)
    is_bias = name.rpartition("/")[2] == "bias"
    if owner is None and (keep == "output" or (keep == "bias" and is_bias)):
      return jnp.ones(shape, bool)
    return jnp.broadcast_to(~any_frozen, shape)

  return jax.tree_util.tree_map_with_path(mask, params)


def reinit_chunk(
  key: jax.Array,
  params: Any,
  capacity: Any,
  layer_key: str,
  chunk: int | jax.Array,
  *,
  init: Initializer | str = _LECUN_NORMAL,
) -> Any:
  """Re-initialises chunk ``chunk`` of capacity layer ``layer_key`` for its active fan-in.

  For every kernel ``K`` of the layer (one for Dense/conv, ``conv1``/``conv2``/``proj`` for a
  residual block) the columns ``j`` with ``floor(j / s) == chunk`` become

      K[..., :, j] = G[..., :, j] · sqrt(n_full / n_active),   G = init(key_K, K.shape),

  where ``n_full = prod(K.shape[:-1])`` is the fan-in the initialiser saw (window × input
  size) and ``n_active = prod(K.shape[:-2]) · #{active input rows}``: the window size times
  the number of input rows that read an active unit of the providing capacity layer
  (``active_p · s_p`` rows, or ``H·W·active_p·s_p`` after a flatten) — or all input rows if
  the input is not capacity-managed. For LeCun normal the new columns thus have standard
  deviation ``sqrt(1 / n_active)``; the rescaling is exact for every fan-in
  variance-scaling initialiser (``lecun_*``, ``he_*``, ``variance_scaling(..., 'fan_in',
  ...)``, whose variance is ``∝ 1 / fan_in``) and only approximate for ``fan_avg``
  (Glorot); other initialisers get the same factor. The counts use the ``active`` values in
  ``capacity`` at the call: raise ``active`` of the previous layer first if it expands in
  the same step (a residual block's ``conv2`` reads the block itself, whose own ``active``
  is used). Rows that read inactive units are drawn at the same scale. The chunk's bias
  entries are set to zero. Nothing else changes.

  Args:
    key: PRNG key.
    params: ``variables['params']``.
    capacity: ``variables['capacity']`` (may be traced).
    layer_key: a key of :func:`capacity_layers`.
    chunk: the chunk index (``int`` or traced ``int32`` scalar).
    init: the kernel initialiser or its name in :data:`INITIALIZERS` (default
      ``nn.initializers.lecun_normal()``), evaluated at the kernel's full shape and rescaled.

  Returns:
    ``params`` with the chunk's columns and bias entries replaced. Jittable.

  Raises:
    ValueError: for an unknown ``layer_key`` or a static ``chunk`` out of range.
  """
  init = initializer(init, what="reinit_chunk: init")
  infos, active, _, edges = _analyse(params, capacity)
  if layer_key not in infos:
    raise ValueError(
      f"reinit_chunk: {layer_key!r} is not a capacity layer; the capacity layers are {list(infos)}."
    )
  info = infos[layer_key]
  if isinstance(chunk, int | np.integer) and isinstance(info.chunks, int):
    if not 0 <= chunk < info.chunks:
      raise ValueError(
        f"reinit_chunk: chunk must be in [0, {info.chunks}) for {layer_key!r}, got {chunk}."
      )
  cols = _chunk_index(info.features, info.chunks) == jnp.asarray(chunk, jnp.int32)
  kernel_names = sorted((n for n, e in edges.items() if e.owner == layer_key), key=_natural)
  index = {n: i for i, n in enumerate(kernel_names)}
  kernel_modules = {_module_of(n) for n in kernel_names}

  def update(path: Any, leaf: Any) -> Any:
    name = path_name(path)
    if name in index:
      shape = np.shape(leaf)
      edge = edges[name]
      if edge.provider is not None:
        p = edge.provider
        act_in, _ = _unit_state(infos[p], active[p], active[p], shape[-2], edge.flatten)
        rows = jnp.sum(act_in.astype(jnp.int32))
      else:
        rows = jnp.asarray(shape[-2], jnp.int32)
      n_full = math.prod(shape[:-1])
      n_active = jnp.maximum(math.prod(shape[:-2]) * rows, 1).astype(jnp.float32)
      g = init(jax.random.fold_in(key, index[name]), shape, jnp.result_type(leaf))
      new = g * jnp.sqrt(n_full / n_active).astype(g.dtype)
      return jnp.where(cols, new, leaf)
    module, _, leaf_name = name.rpartition("/")
    if leaf_name == "bias" and module in kernel_modules and np.shape(leaf)[-1:] == (info.features,):
      return jnp.where(cols, jnp.zeros((), jnp.result_type(leaf)), leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(update, params)
