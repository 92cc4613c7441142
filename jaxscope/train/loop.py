"""The reference loop: :func:`train` runs a :class:`~jaxscope.run.TrainConfig` end to end.

It builds the model, data and optimizer from the config
(:func:`~jaxscope.train.build.setup`), restores the newest
checkpoint when resuming, and steps, evaluates, records and checkpoints into the run
directory (:mod:`jaxscope.run`). With a ``mesh`` the state, batches and evaluation are
placed on a device mesh (:mod:`jaxscope.train.sharding`); in a multi-process run every
process steps and checkpoints, and process 0 alone writes the log and prints.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jaxscope.checkpoint import CheckpointWriter
from jaxscope.data.stats import data_stats
from jaxscope.diagnose.live import LiveDiagnosis
from jaxscope.record import Recorder
from jaxscope.record.rewind import drop_rewound, rewind_log
from jaxscope.run import RunLayout, TrainConfig, check_resume, config_record
from jaxscope.run.lock import RunLock
from jaxscope.run.resume import clear_run, describe_changes, history_entry
from jaxscope.train import sharding
from jaxscope.train.build import Setup, setup
from jaxscope.train.evaluate import make_evaluate
from jaxscope.train.guard import DivergenceGuard, StopFlag, nonfinite_examples, orbax_quiet
from jaxscope.train.resume import restore
from jaxscope.train.step import TrainState

__all__ = ["TrainResult", "train"]


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
  """Whether the run was stopped by Ctrl-C or SIGTERM (logs and a final checkpoint were
  written)."""
  wall_time: float
  stop_signal: int | None = None
  """The signal that stopped the run (``signal.SIGINT`` or ``signal.SIGTERM``), else
  ``None``; the command line exits with ``128 + stop_signal`` (130, 143)."""
  diverged: str | None = None
  """Why ``stop_on="divergence"`` stopped the run (no final evaluation or checkpoint of
  the diverged state is written), else ``None``; the command line exits 1."""


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


def _data_paths(s: Setup) -> tuple[Callable[[np.ndarray], Any], Callable[[Any, Any], Any]]:
  """``gather(indices) -> (x, y)``, a training batch, and ``evaluate(params, model_state)``.

  On one device the training set stays on the device and batches are gathered there. On a
  mesh each process builds the shards of a batch its devices hold from its copy of the
  data (:func:`jaxscope.train.sharding.put_global`), and the evaluation is split over the
  mesh as well (:func:`jaxscope.train.sharding.make_sharded_evaluate`).
  """
  c, ds = s.config, s.dataset
  if s.mesh is None:
    train_x, train_y = jax.device_put(ds.train_x), jax.device_put(ds.train_y)
    gather = jax.jit(lambda idx: (train_x[idx], train_y[idx]))
    evaluate = make_evaluate(
      s.model, ds.test_x, ds.test_y, task=s.task, batch_size=c.eval_batch_size
    )
    return gather, evaluate
  batch = sharding.batch_sharding(s.mesh)
  host_x, host_y = np.asarray(ds.train_x), np.asarray(ds.train_y)

  def gather_global(idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
    return sharding.put_global(host_x[idx], batch), sharding.put_global(host_y[idx], batch)

  shardings = s.state_shardings()
  evaluate = sharding.make_sharded_evaluate(
    s.model,
    ds.test_x,
    ds.test_y,
    task=s.task,
    batch_size=c.eval_batch_size,
    mesh=s.mesh,
    shardings=(shardings.params, shardings.model_state),
  )
  return gather_global, evaluate


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
  """Trains ``config.model`` on ``config.dataset`` and writes a run directory.

  Args:
    config: the run's configuration (default :class:`~jaxscope.run.TrainConfig`).
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
  config = dataclasses.replace(config or TrainConfig(), **overrides)
  if config.overwrite and config.resume:
    raise ValueError("train: overwrite and resume exclude each other; give one of them.")
  t_start = time.perf_counter()
  s = setup(config)
  config = s.config
  layout = RunLayout(Path(config.out))
  lead = jax.process_index() == 0  # Process 0 locks, clears and writes the log.
  lock = RunLock(layout.lock) if lead else None
  if lock is not None:
    lock.acquire()
  try:
    if config.overwrite and lead:
      clear_run(layout)
    plan = check_resume(layout, config, s.total_steps)
    sharding.sync_processes("jaxscope.train: run directory checked")  # before anyone writes
    with orbax_quiet():
      return _start(s, layout, plan, lock, t_start)
  finally:
    if lock is not None:
      lock.release()


def _start(
  s: Setup, layout: RunLayout, plan: Any, lock: RunLock | None, t_start: float
) -> TrainResult:
  """Restores (when resuming), writes the config and runs the loop of :func:`train`."""
  config, lead = s.config, jax.process_index() == 0
  if lock is not None and lock.stale:
    warnings.warn(
      f"train: took over {layout.lock}, left by a run that ended without releasing it "
      f"(pid {lock.stale.get('pid')} on {lock.stale.get('host')}).",
      stacklevel=3,
    )
  if config.resume and not plan.resume:
    warnings.warn(f"train: nothing to resume in {layout.root}; starting a new run.", stacklevel=3)
  ckpt = CheckpointWriter(layout.checkpoints, config.max_to_keep)
  restored = restore(s, ckpt, layout, plan, setup) if plan.resume else None
  state, start = (restored.state, restored.start) if restored else (None, 0)
  if state is None:
    state = s.initial_state()
  changes = plan.changes if start else ()
  if lead and plan.resume:
    rewind_log(layout.root, start if start else -1)
  if restored is not None and (restored.notes or changes):
    what = [f"changed {describe_changes(changes)}"] if changes else []
    warnings.warn(
      f"train(resume=True): resuming {layout.root} at step {start}: "
      + "; ".join([*what, *restored.notes])
      + ".",
      stacklevel=3,
    )
  record = None
  xla_step = s.xla_options()  # Traces the model once: the record and the step share it.
  if not (start and layout.config.exists()) or changes:  # A resumed run keeps its config...
    record = config_record(
      config,
      versions=_versions(),
      task=s.task,
      steps_per_epoch=s.steps_per_epoch,
      total_steps=s.total_steps,
      input_shape=list(s.dataset.train_x.shape[1:]),
      num_classes=int(s.dataset.num_classes),
      device_count=1 if s.mesh is None else int(s.mesh.size),
      process_count=jax.process_count(),
      data_stats=data_stats(s.dataset),
      xla_step_options=xla_step,
      config_history=[  # ...unless it changes: then the change is recorded.
        *plan.old.get("config_history", []),
        *([history_entry(start, changes)] if changes else []),
      ],
    )
  recorder = Recorder(layout.root, tensorboard=config.tensorboard, config=record)
  alpha_from = restored.alpha_from if restored else 1
  loop = _Loop(s, state, recorder, ckpt, layout.root, t_start, alpha_from, xla_step)
  return loop.run(start)


class _Loop:
  """The stepping, evaluation, recording and checkpointing of one :func:`train` call."""

  def __init__(
    self,
    s: Setup,
    state: TrainState,
    recorder: Recorder,
    ckpt: CheckpointWriter,
    run_dir: Path,
    t_start: float,
    alpha_from: int,
    xla_options: list[str],
  ) -> None:
    c = s.config
    self.s, self.state, self.recorder, self.ckpt = s, state, recorder, ckpt
    self.run_dir, self.t_start, self.alpha_from = run_dir, t_start, alpha_from
    self.step_fn = s.train_step(xla_options)
    self.gather, self.evaluate = _data_paths(s)
    self.eval_every = c.eval_every or s.steps_per_epoch
    self.ckpt_every = s.steps_per_epoch if c.checkpoint_every is None else c.checkpoint_every
    self.last_eval: dict[str, float] = {}
    self.last_eval_step = -1
    self.bar: Any = None
    self.live: LiveDiagnosis | None = None
    self.guard = (
      DivergenceGuard(bad_examples=nonfinite_examples(s.dataset.train_x, s.dataset.train_y))
      if c.stop_on == "divergence"
      else None
    )
    self.diverged: str | None = None

  def _emit(self, msg: str) -> None:
    if self.bar is not None:
      self.bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr)

  def run_eval(self, step: int) -> None:
    values = self.evaluate(self.state.params, self.state.model_state)
    self.recorder.write(step, values)
    self.last_eval = {k: float(v) for k, v in values.items()}
    self.last_eval_step = step
    if self.live is not None:
      self.live(step)

  def meta(self, step: int) -> dict[str, Any]:
    # eval_* are the latest evaluation's, taken at eval_step (≤ step).
    return {
      "step": step,
      "epoch": step / self.s.steps_per_epoch,
      "wall_time": time.perf_counter() - self.t_start,
      **{k.replace("test/", "eval_"): v for k, v in self.last_eval.items()},
      **({"eval_step": self.last_eval_step} if self.last_eval else {}),
    }

  def run(self, start: int) -> TrainResult:
    s, c = self.s, self.s.config
    total = s.total_steps
    lead = jax.process_index() == 0  # Only process 0 prints and diagnoses.
    if not c.quiet and lead:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, initial=start, unit="step", desc=f"{c.model}/{c.dataset}")
    if c.live_diagnosis and lead:
      self.live = LiveDiagnosis(self.run_dir, total, emit=self._emit, flush=self.recorder.flush)
    stop = StopFlag()
    step = start
    try:
      with stop.catch_signals(jax.process_count() == 1):
        if start == 0:
          self.run_eval(0)
          self.checkpoint(0)
        step = self._steps(start, stop)
    finally:
      if self.bar is not None:
        self.bar.close()
      self.recorder.close()
      self.ckpt.close()
    if not self.last_eval:
      values = self.evaluate(self.state.params, self.state.model_state)
      self.last_eval = {k: float(v) for k, v in values.items()}
    return TrainResult(
      self.state,
      self.run_dir,
      step,
      dict(self.last_eval),
      stop.requested,
      time.perf_counter() - self.t_start,
      stop.signum,
      self.diverged,
    )

  def checkpoint(self, step: int) -> None:
    """Saves the checkpoint of ``step`` after the log holds every record before it, so a
    run resumed from it (:func:`jaxscope.record.rewind.rewind_log`) misses none."""
    self.recorder.flush()
    if jax.process_index() == 0:
      drop_rewound(self.run_dir, step)
    self.ckpt.save(step, self.state, self.meta(step))

  def _stop_if(self, why: str | None) -> bool:
    """``stop_on="divergence"``: writes the held record (a ``stop/nonfinite_loss`` record
    instead when ``why`` says it diverged with a non-finite loss); whether the run stops (then said
    once, naming the values that were non-finite)."""
    guard = self.guard
    assert guard is not None
    bad = DivergenceGuard.nonfinite_keys(guard.held[1]) if why and guard.held else []
    at = guard.held[0] + 1 if guard.held else 0
    record = guard.release(why is not None)
    if record is not None:
      self.recorder.write(*record)
    if why is None:
      return False
    if bad:
      why += f"; non-finite: {', '.join(bad[:4])}{', …' if len(bad) > 4 else ''}"
    self._say_stop(at, why)
    return True

  def _say_stop(self, step: int, why: str) -> None:
    self.diverged = why
    self.recorder.flush()
    self._emit(
      f"jaxscope: stopped at step {step} (--stop-on divergence): {why}; "
      f"jaxscope diagnose {self.run_dir} names where it started."
    )

  def _settle(self) -> bool:
    """Reads the held step's loss (waiting for it) and writes its record; whether the run
    diverged there (``stop_on="divergence"``; without it, ``False``)."""
    return self.guard is not None and self._stop_if(self.guard.settle())

  def _write(self, step: int, values: Mapping[str, Any]) -> bool:
    """Records ``step``; with ``stop_on="divergence"`` holds it back until its loss is read
    and writes the step before; whether the run stops."""
    if self.guard is None:
      self.recorder.write(step, values)
      return False
    if self._stop_if(self.guard.check(step, values["loss"])):
      return True
    self.guard.hold(step, values)
    return False

  def _bad_batch(self, step: int, indices: np.ndarray) -> bool:
    """``stop_on="divergence"``: whether the batch of ``step`` holds a non-finite example
    (the run then stops before the step, with a ``stop/nonfinite_batch`` record at it)."""
    why = self.guard.check_batch(step, indices) if self.guard is not None else None
    if why is None:
      return False
    if not self._settle():
      self.recorder.write(step, {"stop/nonfinite_batch": 1.0})
      self._say_stop(step, why)
    return True

  def _steps(self, step: int, stop: StopFlag) -> int:
    """Steps from ``step`` until the end or a stop request; returns the last step."""
    s, c = self.s, self.s.config
    total, n_train = s.total_steps, len(s.dataset.train_x)
    order, order_epoch = None, -1
    pending_loss: jax.Array | None = None
    measuring = s.scope is not None or s.instruments is not None
    while step < total and not stop.requested:
      epoch, i = divmod(step, s.steps_per_epoch)
      if epoch != order_epoch:
        order, order_epoch = _epoch_order(c.seed, epoch, n_train), epoch
      indices = order[i * c.batch_size : (i + 1) * c.batch_size]  # type: ignore[index]
      if self._bad_batch(step, indices):
        return step
      x, y = self.gather(indices)
      phase = s.optimizer.phase_of(step) if s.optimizer.phase_of is not None else None
      measure = measuring and step % c.every == 0
      self.state, values = self.step_fn(self.state, x, y, measure=measure, phase=phase)
      if "alpha" in values and not (step >= self.alpha_from and (step - 1) % c.every == 0):
        # α of the update of step t - 1 is known at step t; other steps repeat an old one.
        values = values.without("alpha")
      if self._write(step, values):
        return step
      if self.bar is not None:
        if pending_loss is not None and (step % 10 == 0 or step == total - 1):
          shown = {k.replace("/", "_"): f"{v:.4f}" for k, v in self.last_eval.items()}
          self.bar.set_postfix(loss=f"{float(pending_loss):.4f}", **shown)
        pending_loss = values["loss"]
        self.bar.update(1)
      step += 1
      evaluate = step % self.eval_every == 0 or step == total or stop.requested
      save = (self.ckpt_every and step % self.ckpt_every == 0) or step == total or stop.requested
      if (evaluate or save) and self._settle():
        return step
      if evaluate:
        self.run_eval(step)
      if save:
        self.checkpoint(step)
    self._settle()
    return step
