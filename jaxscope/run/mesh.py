"""A run's device mesh and partition rule: where its batches and every leaf of its state live.

The one definition of a run's layout, shared by the loop that trains on it
(:mod:`jaxscope.train.sharding`) and by :func:`jaxscope.load_run`, which restores the run's
checkpoints into the same layout for the analyses. A run with ``mesh`` set
(:class:`~jaxscope.run.TrainConfig`, ``--mesh data=2,fsdp=4``) is placed on a
:class:`jax.sharding.Mesh` with the axes :data:`~jaxscope.run.config.MESH_AXES`,
``("data", "fsdp")``:

* **Batches** are split along their first axis over both axes,
  ``NamedSharding(mesh, P(("data", "fsdp")))`` (:func:`batch_sharding`).
* **The state** (parameters, model state, optimizer state, the instruments' state) follows
  one rule per leaf (:func:`leaf_spec`): with ``fsdp = 1`` every leaf is replicated (data
  parallel); with ``fsdp = F > 1`` a leaf of at least :data:`MIN_SHARD_SIZE` elements is
  split along its largest axis whose length ``F`` divides (the first such axis on a tie),
  and replicated over ``data``; smaller leaves, scalars and leaves with no divisible axis
  are replicated. The rule depends on the shape only, so a parameter, its gradient, its
  update and its optimizer moments are laid out alike, and each device holds about ``1/F``
  of the state (fully sharded data parallelism, ZeRO-3: Rajbhandari et al. 2020,
  arXiv:1910.02054; Zhao et al. 2023, arXiv:2304.11277).

:func:`run_mesh` rebuilds a recorded run's mesh on the devices present now, and
:func:`checkpoint_sharding` turns it into the ``sharding`` rule of
:class:`jaxscope.checkpoint.RunCheckpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscope.run.config import MESH_AXES, batch_split, parse_mesh

__all__ = [
  "BATCH_AXES",
  "MIN_SHARD_SIZE",
  "abstract_with",
  "batch_sharding",
  "checkpoint_sharding",
  "device_bytes",
  "leaf_spec",
  "make_mesh",
  "put_global",
  "replicated",
  "run_mesh",
  "state_shardings",
]

#: The mesh axes a batch is split over (its first axis).
BATCH_AXES = MESH_AXES

#: Leaves with fewer elements are replicated on every device (4 KiB of float32): sharding
#: them saves little memory and costs a gather each.
MIN_SHARD_SIZE = 1024


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """The ``("data", "fsdp")`` mesh of ``spec`` (``"data=2,fsdp=4"`` or a dict; an axis left
  out has size 1) over ``devices`` (default: every device of every process).

  The axes are :class:`~jax.sharding.AxisType` ``Auto``: shardings are given to ``jit``
  and XLA propagates them through the computation.

  Raises:
    ValueError: a bad spec, or sizes whose product is not the number of devices.
  """
  sizes = parse_mesh(spec)
  if sizes is None:
    raise ValueError("make_mesh: spec names no axis; e.g. data=4 or data=2,fsdp=2.")
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  if math.prod(shape) != len(devices):
    given = ",".join(f"{a}={n}" for a, n in sizes.items())
    raise ValueError(
      f"mesh {given} needs {math.prod(shape)} devices, but the run has {len(devices)} "
      f"({jax.process_count()} process(es)); the sizes must multiply to the device count "
      "(limit the visible devices, e.g. CUDA_VISIBLE_DEVICES, to use fewer)."
    )
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def run_mesh(
  spec: str | Mapping[str, int] | None, devices: Sequence[Any] | None = None
) -> Mesh | None:
  """The mesh of a recorded run (``config.json``'s ``mesh``) on the devices present now:
  ``make_mesh(spec)`` over the first ``data × fsdp`` of ``devices`` (default
  ``jax.devices()``), or ``None`` when ``spec`` names no mesh (a one-device run) or fewer
  devices are present than the mesh needs.

  Raises:
    ValueError: ``spec`` is not a mesh (:func:`~jaxscope.run.config.parse_mesh`).
  """
  sizes = parse_mesh(spec)
  if sizes is None:
    return None
  devices = list(jax.devices() if devices is None else devices)
  need = batch_split(sizes)
  if len(devices) < need:
    return None
  return make_mesh(sizes, devices[:need])


def leaf_spec(shape: Sequence[int], fsdp: int, min_size: int = MIN_SHARD_SIZE) -> P:
  """The :class:`~jax.sharding.PartitionSpec` of a state leaf of ``shape`` on a mesh whose
  ``fsdp`` axis has size ``fsdp``.

  ``P()`` (replicated) when ``fsdp == 1``, when the leaf has fewer than ``min_size``
  elements, or when no axis length is a multiple of ``fsdp``; otherwise ``"fsdp"`` on the
  largest axis whose length is a multiple of ``fsdp`` (the first of equal ones), e.g.
  ``[64, 256]`` with ``fsdp = 4`` → ``P(None, "fsdp")``.
  """
  shape = tuple(int(n) for n in shape)
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  fits = [(n, -i) for i, n in enumerate(shape) if n % fsdp == 0]
  if not fits:
    return P()
  axis = -max(fits)[1]
  return P(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def state_shardings(mesh: Mesh, tree: Any, min_size: int = MIN_SHARD_SIZE) -> Any:
  """A pytree of :class:`~jax.sharding.NamedSharding` for every leaf of ``tree`` (arrays or
  ``jax.ShapeDtypeStruct``), by :func:`leaf_spec` with the mesh's ``fsdp`` size."""
  fsdp = int(mesh.shape.get("fsdp", 1))
  return jax.tree.map(lambda a: NamedSharding(mesh, leaf_spec(np.shape(a), fsdp, min_size)), tree)


def checkpoint_sharding(mesh: Mesh) -> Callable[[Any], Any]:
  """The ``sharding`` rule of :class:`jaxscope.checkpoint.RunCheckpoints` that restores a
  checkpoint of a run trained on ``mesh`` into the run's layout: a tree of
  ``jax.ShapeDtypeStruct`` → its :func:`state_shardings` on ``mesh``."""

  def rule(abstract: Any) -> Any:
    return state_shardings(mesh, abstract)

  return rule


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Axis ``batch_axis`` split over ``data`` and ``fsdp`` (:data:`BATCH_AXES`)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def abstract_with(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves of ``tree``'s shapes and dtypes with ``shardings``: an
  orbax restore target that places the restored arrays as the run does."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, shardings
  )


def put_global(array: Any, sharding: NamedSharding) -> jax.Array:
  """A global array of ``sharding`` from the host array ``array`` (the same values in every
  process): each process copies only the slices its own devices hold
  (:func:`jax.make_array_from_callback`), never the whole array to one device."""
  host = np.asarray(array)
  host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def device_bytes(tree: Any) -> int:
  """The most bytes of ``tree``'s arrays that any one device of this process holds (its
  shards, replicas counted on each device): the per-device memory of a layout."""
  held: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values(), default=0)
