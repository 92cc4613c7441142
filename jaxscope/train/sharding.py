"""Device meshes for the reference loop: the mesh, the partition rule, batches and launch.

A run with ``mesh`` set (:class:`~jaxscope.run.TrainConfig`, ``--mesh data=2,fsdp=4``)
places everything on a :class:`jax.sharding.Mesh` with the axes ``("data", "fsdp")``:

* **Batches** are split along their first axis over both axes,
  ``NamedSharding(mesh, P(("data", "fsdp")))``: every device computes the loss and
  gradient of ``batch_size / (data·fsdp)`` examples (:func:`batch_sharding`).
* **The state** (parameters, model state, optimizer state with the scope's state inside
  it, the instruments' state) follows one rule per leaf (:func:`leaf_spec`): with
  ``fsdp = 1`` every leaf is replicated (data parallel); with ``fsdp = F > 1`` a leaf of
  at least :data:`MIN_SHARD_SIZE` elements is split along its largest axis whose length
  ``F`` divides (the first such axis on a tie), and replicated over ``data``; smaller
  leaves, scalars and leaves with no divisible axis are replicated. The rule depends on
  the shape only, so a parameter, its gradient, its update and its optimizer moments
  are laid out alike, and each device holds about ``1/F`` of the state (fully sharded
  data parallelism, ZeRO-3: Rajbhandari et al. 2020, arXiv:1910.02054; Zhao et al. 2023,
  arXiv:2304.11277).
* **The step** is jitted with the state's shardings as ``out_shardings``, so the layout is
  the same after every step; XLA inserts the gradient reductions and gathers each sharded
  parameter where the forward pass needs it. The metrics are reductions inside the same
  program (norms, moments, ratios as sums of per-shard partial sums), so they need no
  gathered parameter: their values equal the single-device ones up to float32 summation
  order.

Multi-process runs (several hosts): :func:`initialize_distributed` calls
:func:`jax.distributed.initialize` when the launch environment says so, each process
builds its shards of a batch from its own copy of the data (:func:`put_global`), and the
loop writes logs and figures from process 0 only (checkpoints go through orbax, which all
processes call). See ``docs/sharding.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscope.analysis.kernel import EvalSet, make_eval_set, make_evaluator
from jaxscope.run.config import MESH_AXES, batch_split, parse_mesh

__all__ = [
  "BATCH_AXES",
  "MIN_SHARD_SIZE",
  "abstract_with",
  "batch_sharding",
  "device_bytes",
  "initialize_distributed",
  "leaf_spec",
  "make_mesh",
  "make_sharded_evaluate",
  "put_global",
  "replicated",
  "state_shardings",
  "sync_processes",
]

#: The mesh axes a batch is split over (its first axis).
BATCH_AXES = MESH_AXES

#: Leaves with fewer elements are replicated on every device (4 KiB of float32): sharding
#: them saves little memory and costs a gather each.
MIN_SHARD_SIZE = 1024


# --------------------------------------------------------------------------- launch


def _launched_multiprocess() -> bool:
  """Whether the environment describes a multi-process launch that
  :func:`jax.distributed.initialize` can read."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_distributed() -> bool:
  """Starts JAX's multi-process runtime when the launch environment asks for it.

  Calls :func:`jax.distributed.initialize` once, before any computation, when
  ``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``,
  read here, or a cluster JAX detects for the rest), or when a Slurm job step or an Open MPI
  launch with more than one task is detected (JAX reads its parameters). Does nothing when
  the runtime is already up (a caller's own ``jax.distributed.initialize()``) or in a
  single-process launch.

  Returns:
    Whether the multi-process runtime is up.

  Raises:
    ValueError: ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID`` is not an integer.
  """
  if jax.distributed.is_initialized():
    return True
  if not _launched_multiprocess():
    return False
  kwargs: dict[str, Any] = {}
  for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    text = os.environ.get(env)
    if text:
      try:
        kwargs[key] = int(text)
      except ValueError:
        raise ValueError(f"train: {env} must be an integer, got {text!r}.") from None
  jax.distributed.initialize(**kwargs)
  return True


def sync_processes(name: str) -> None:
  """A barrier across the run's processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- mesh and rule


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """The ``("data", "fsdp")`` mesh of ``spec`` (``"data=2,fsdp=4"`` or a dict; an axis left
  out has size 1) over ``devices`` (default: every device of every process).

  The axes are :class:`~jax.sharding.AxisType` ``Auto``: shardings are given to ``jit``
  and XLA propagates them through the step.

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
      f"train: mesh {given} needs {math.prod(shape)} devices, but the run has {len(devices)} "
      f"({jax.process_count()} process(es)); the sizes must multiply to the device count "
      "(limit the visible devices, e.g. CUDA_VISIBLE_DEVICES, to use fewer)."
    )
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


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


# --------------------------------------------------------------------------- evaluation


def make_sharded_evaluate(
  model: Any,
  x: np.ndarray,
  y: np.ndarray,
  *,
  task: str,
  batch_size: int,
  mesh: Mesh,
  shardings: tuple[Any, Any],
) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """``evaluate(params, model_state) -> {"test/loss", "test/accuracy", ...}`` on ``mesh``.

  The same computation and values as :func:`jaxscope.train.make_evaluate` (the analysis
  kernel, :func:`jaxscope.analysis.kernel.make_evaluator`: exact means over the ``n``
  examples of the padded, scanned batches; for per-token labels ``y [n, T]`` also
  ``test/perplexity = exp(L)`` and ``test/bits_per_token = L / ln 2``) with each
  evaluation batch split over
  :data:`BATCH_AXES` and the parameters kept in their layout (``shardings``: those of
  ``params`` and ``model_state``). The batch is ``min(batch_size, n)`` rounded down to a
  multiple of the split (padding rows carry weight 0).

  Raises:
    ValueError: fewer examples than the batch is split into.
  """
  parts, n = batch_split(dict(mesh.shape)), len(x)
  if n < parts:
    raise ValueError(
      f"train: the evaluation split has {n} examples, fewer than the {parts} parts the mesh "
      "splits a batch into."
    )
  size = min(batch_size, n) // parts * parts
  es = make_eval_set(x, y, batch_size=size)
  sharding = batch_sharding(mesh, batch_axis=1)
  arrays = tuple(put_global(np.asarray(a), sharding) for a in (es.x, es.y, es.mask))
  count, digest = es.n, es.digest
  per_token = task == "classification" and np.ndim(y) == 2
  del es  # Its arrays on the default device are no longer needed.

  def apply_fn(p: Any, s: Any, xb: jax.Array) -> jax.Array:
    return model.apply({"params": p, **s}, xb, train=False)[0]

  def run(params: Any, model_state: Any, xs: Any, ys: Any, mask: Any) -> dict[str, jax.Array]:
    kernel = make_evaluator(apply_fn, EvalSet(xs, ys, mask, count, digest), task=task)
    loss, accuracy = kernel(params, model_state)
    out = {"test/loss": loss}
    if task == "classification":
      out["test/accuracy"] = accuracy
    if per_token:
      out["test/perplexity"] = jnp.exp(loss)
      out["test/bits_per_token"] = loss / np.float32(math.log(2.0))
    return out

  compiled = jax.jit(
    run, in_shardings=(*shardings, sharding, sharding, sharding), out_shardings=replicated(mesh)
  )
  return lambda params, model_state: compiled(params, model_state, *arrays)
