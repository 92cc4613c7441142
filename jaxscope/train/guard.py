"""What stands between a training loop and the faults around it: signals that ask it to
stop (:class:`StopFlag`) and orbax's reports of a failed save (:func:`orbax_quiet`)."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["DivergenceGuard", "StopFlag", "nonfinite_examples", "orbax_quiet"]


class StopFlag:
  """Turns the first Ctrl-C (SIGINT) or SIGTERM (what schedulers and ``docker stop`` send)
  into a request to stop after the current step.

  The loop then evaluates, writes a final checkpoint and flushes the logs; a second
  signal interrupts at once (``KeyboardInterrupt``), still closing the recorder and
  waiting for checkpoints being written.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self) -> None:
    self.requested = False
    self.signum: int | None = None

  @contextlib.contextmanager
  def catch_signals(self, enabled: bool = True) -> Any:
    # Signal handlers can only be installed from the main thread. In a multi-process run
    # the processes would see the signal at different steps and stop at different ones
    # (their collectives would then wait forever): a signal interrupts at once there, and
    # the run resumes from its last periodic checkpoint.
    if not enabled or threading.current_thread() is not threading.main_thread():
      yield
      return

    def handler(signum: int, frame: Any) -> None:
      if self.requested:
        raise KeyboardInterrupt
      self.requested, self.signum = True, signum
      name = signal.Signals(signum).name
      print(
        f"\njaxscope: {name}: stopping after this step (writing logs and a checkpoint); "
        "Ctrl-C again to abort.",
        file=sys.stderr,
        flush=True,
      )

    previous = {sig: signal.signal(sig, handler) for sig in self.SIGNALS}
    try:
      yield
    finally:
      for sig, before in previous.items():
        signal.signal(sig, before)


@contextlib.contextmanager
def orbax_quiet() -> Any:
  """Orbax's save threads log each failure (e.g. a full disk) with tracebacks at absl's
  ERROR level, hundreds of lines before the error itself reaches the caller, and its
  TensorStore callbacks report "Event loop is closed" once per pending write after it: while
  the loop runs, only absl's CRITICAL messages are shown and those reports are dropped. A
  TensorStore write failure (a ``ValueError`` carrying ``os_error_code``) is raised as the
  ``OSError`` it is, naming the file."""
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels, hook = [lg.level for lg in loggers], sys.unraisablehook
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)

  def unraisable(report: Any) -> None:
    if not (isinstance(report.exc_value, RuntimeError) and "closed" in str(report.exc_value)):
      hook(report)

  sys.unraisablehook = unraisable
  try:
    yield
  except ValueError as e:
    error = _storage_error(e)
    del e
    gc.collect()  # Orbax's failed futures report themselves when collected: here, quietly.
    raise error from None
  finally:
    sys.unraisablehook = hook
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def _storage_error(error: ValueError) -> Exception:
  """The ``OSError`` inside a TensorStore error message, else ``error`` itself."""
  text = str(error)
  code = re.search(r"os_error_code='(\d+)'", text)
  if code is None:
    return error
  path = re.search(r'Error writing (?:local )?file "([^"]+)"', text)
  number = int(code.group(1))
  return OSError(number, os.strerror(number), path.group(1) if path else None)


class DivergenceGuard:
  """``--stop-on divergence``: stops a run whose loss has diverged before the step that
  diverged is recorded, without stalling the device.

  The loop holds each step's record back (:meth:`hold`) until the step's loss is read,
  which :meth:`check` does one step behind: it is given the loss of the step just
  dispatched (a device scalar) and reads the previous step's, which the device has
  finished. A non-finite loss, or one above ``factor ×`` the first finite loss (the
  divergence rule of :mod:`jaxscope.diagnose`, default 10), is a divergence. An exploded
  (finite) step is recorded and the run stops; a non-finite step is not recorded: the log
  gets a ``stop/nonfinite_loss`` record at its step instead, and the message names the values
  that were non-finite, the first layer in depth order first. At evaluations, checkpoints
  and the end the loop settles the held record (:meth:`settle`, which waits for it).

  Data whose training examples hold NaN/Inf makes divergence certain before any loss
  shows it: given those examples' indices (:func:`nonfinite_examples`),
  :meth:`check_batch` stops the run before the first step whose batch holds one (the
  log gets a ``stop/nonfinite_batch`` record at that step).

  Args:
    factor: the divergence factor (``Thresholds.divergence_factor``).
    bad_examples: indices of the training examples with a non-finite input or target.
  """

  def __init__(self, factor: float = 10.0, bad_examples: Any = ()) -> None:
    self.factor = float(factor)
    self.initial: float | None = None
    self.bad_examples = np.unique(np.asarray(bad_examples, dtype=np.int64))
    self._pending: Any = None
    self._pending_step = -1
    self.held: tuple[int, Mapping[str, Any]] | None = None
    """The record of the last step dispatched, not yet written."""

  def check(self, step: int, loss: Any) -> str | None:
    """Remembers ``loss`` of ``step``; returns why the run diverged at the previous step,
    or ``None``."""
    prev, prev_step = self._pending, self._pending_step
    self._pending, self._pending_step = loss, step
    if prev is None:
      return None
    return self._judge(prev_step, float(prev))

  def settle(self) -> str | None:
    """Reads the loss of the last step given to :meth:`check` (waiting for the device);
    returns why it diverged, or ``None``."""
    prev, prev_step = self._pending, self._pending_step
    self._pending, self._pending_step = None, -1
    return None if prev is None else self._judge(prev_step, float(prev))

  def _judge(self, step: int, value: float) -> str | None:
    if not math.isfinite(value):
      return f"the loss at step {step} is {value}"
    if self.initial is None:
      self.initial = value
      return None
    if self.initial > 0 and value > self.factor * self.initial:
      return (
        f"the loss at step {step} is {value:.3g}, above {self.factor:g} × the initial "
        f"{self.initial:.3g}"
      )
    return None

  def hold(self, step: int, values: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]] | None:
    """Holds the record of ``step`` back; returns the one held before (to be written once
    :meth:`check` has passed it), or ``None``."""
    out, self.held = self.held, (step, values)
    return out

  def release(self, diverged: bool) -> tuple[int, Mapping[str, Any]] | None:
    """The held record as it may be written: as it is, unless ``diverged`` with a
    non-finite loss; then a ``stop/nonfinite_loss`` record at its step. ``None`` if none is
    held."""
    held, self.held = self.held, None
    if held is None or not diverged:
      return held
    step, values = held
    loss = float(values["loss"])
    if math.isfinite(loss):
      return held
    return step, {"stop/nonfinite_loss": 1.0}

  @staticmethod
  def nonfinite_keys(values: Mapping[str, Any]) -> list[str]:
    """The keys of ``values`` whose value is NaN/Inf (update/weight ratios left out: a
    zero-initialised bias gives +Inf), per-layer keys in depth order first."""
    from jaxscope.diagnose.series import _natural_key

    bad = []
    values = jax.device_get(values)  # One transfer (of a packed mapping's few arrays).
    for k, v in values.items():
      if k.split("/")[1:2] in (["ratio"], ["ratio_new"]):
        continue
      a = np.asarray(v, dtype=np.float64)
      if a.size and not np.isfinite(a).all():
        bad.append(k)
    layered = [k for k in bad if k.count("/") >= 2]
    return sorted(layered, key=lambda k: _natural_key(k.split("/", 2)[2])) + [
      k for k in bad if k.count("/") < 2
    ]

  def check_batch(self, step: int, indices: np.ndarray) -> str | None:
    """Why the batch of ``step`` (training example ``indices``) makes divergence certain:
    it holds an example with a non-finite input or target; else ``None``."""
    if not self.bad_examples.size:
      return None
    hit = np.intersect1d(np.asarray(indices), self.bad_examples)
    if not hit.size:
      return None
    return (
      f"the batch of step {step} holds {hit.size} training example(s) with a non-finite "
      f"input or target (index {int(hit[0])}): the step would make the parameters non-finite"
    )


def nonfinite_examples(x: Any, y: Any) -> np.ndarray:
  """Indices of the examples (rows of ``x`` and ``y``) with a NaN/Inf entry."""
  bad = np.zeros(len(x), dtype=bool)
  for a in (x, y):
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
      bad |= ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
  return np.flatnonzero(bad)
