"""Device meshes for the reference loop: batches, evaluation and the multi-process launch.

A run with ``mesh`` set (:class:`~jaxscope.run.TrainConfig`, ``--mesh data=2,fsdp=4``)
places everything on a :class:`jax.sharding.Mesh` with the axes ``("data", "fsdp")``. The
mesh and the partition rule are the run's (:mod:`jaxscope.run.mesh`, re-exported here:
:func:`make_mesh`, :func:`leaf_spec`, :func:`state_shardings`, :func:`batch_sharding`,
:func:`replicated`, :func:`abstract_with`, :func:`put_global`, :func:`device_bytes`), so
that :func:`jaxscope.load_run` restores a run's checkpoints into the layout it trained in:

* **Batches** are split along their first axis over both axes: every device computes the
  loss and gradient of ``batch_size / (data·fsdp)`` examples (:func:`batch_sharding`).
* **The state** (parameters, model state, optimizer state with the scope's state inside
  it, the instruments' state) follows one shape rule per leaf (:func:`leaf_spec`):
  replicated with ``fsdp = 1``, otherwise leaves of at least :data:`MIN_SHARD_SIZE`
  elements split over ``fsdp`` along their largest divisible axis (ZeRO-3).
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

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxscope.run.mesh import (
  BATCH_AXES,
  MIN_SHARD_SIZE,
  abstract_with,
  batch_sharding,
  device_bytes,
  leaf_spec,
  make_mesh,
  put_global,
  replicated,
  state_shardings,
)
from jaxscope.train.evaluate import make_evaluate

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
  """``evaluate(params, model_state) -> {"test/loss", "test/accuracy", ...}`` on ``mesh``:
  :func:`jaxscope.train.make_evaluate` with ``mesh`` and ``shardings`` (those of ``params``
  and ``model_state``), each evaluation batch split over :data:`BATCH_AXES`.

  Raises:
    ValueError: fewer examples than the batch is split into.
  """
  return make_evaluate(
    model, x, y, task=task, batch_size=batch_size, mesh=mesh, shardings=shardings
  )
