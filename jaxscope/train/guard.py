"""What stands between a training loop and the faults around it: signals that ask it to
stop (:class:`StopFlag`) and orbax's reports of a failed save (:func:`orbax_quiet`)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

__all__ = ["DivergenceGuard", "StopFlag", "orbax_quiet"]


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
  """``--stop-on divergence``: stops a run whose loss has diverged, one step behind.

  Each :meth:`check` is given the loss of the step just dispatched (a device scalar) and
  reads the previous step's, which the device has finished (so the step is not stalled):
  a non-finite loss, or one above ``factor ×`` the first finite loss (the divergence rule
  of :mod:`jaxscope.diagnose`, default 10), is a divergence. The loop then stops before it
  records the step after it, so an explosion that precedes the NaN leaves no NaN step in
  the log.

  Args:
    factor: the divergence factor (``Thresholds.divergence_factor``).
  """

  def __init__(self, factor: float = 10.0) -> None:
    self.factor = float(factor)
    self.initial: float | None = None
    self._pending: Any = None
    self._pending_step = -1

  def check(self, step: int, loss: Any) -> str | None:
    """Remembers ``loss`` of ``step``; returns why the run diverged at the previous step,
    or ``None``."""
    prev, prev_step = self._pending, self._pending_step
    self._pending, self._pending_step = loss, step
    if prev is None:
      return None
    value = float(prev)
    if value != value or value in (float("inf"), float("-inf")):
      return f"the loss at step {prev_step} is {value}"
    if self.initial is None:
      self.initial = value
      return None
    if self.initial > 0 and value > self.factor * self.initial:
      return (
        f"the loss at step {prev_step} is {value:.3g}, above {self.factor:g} × the initial "
        f"{self.initial:.3g}"
      )
    return None
