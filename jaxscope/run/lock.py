"""One writer per run directory: an advisory lock held while a run trains.

:class:`RunLock` takes an exclusive ``fcntl.flock`` on ``RUN/.lock`` and writes into it
who holds it (pid, host, start time, command). A second run on the same directory fails at
once with :class:`RunLockedError`, naming the holder; the first is untouched. The kernel
releases the lock when its holder ends, however it ends (``kill -9`` included), so a lock
left by a dead process is never in the way: the next run finds the file, sees that no one
holds it and takes it over (the file's old contents are reported as stale).

Where ``flock`` is not supported (some network file systems), the lock falls back to
creating the file exclusively; a stale file left by a dead process on this host is then
detected from its pid and taken over, and one left by another host is reported with how to
clear it (delete ``RUN/.lock`` once that run is known to have stopped).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["RunDirError", "RunLock", "RunLockedError"]


class RunDirError(OSError):
  """The run directory cannot be created (e.g. under ``/proc``, or below a file): an
  ``OSError`` that is not a ``FileNotFoundError``, since the path is an output, not an input
  that is missing (the command line exits 74, not 2)."""


class RunLockedError(RuntimeError):
  """The run directory is in use by another run (the message names the holder)."""


def _holder() -> dict[str, Any]:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "python",
  }


def _read(path: Path) -> dict[str, Any]:
  try:
    text = path.read_text(encoding="utf-8")
    info = json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {}
  return info if isinstance(info, dict) else {}


def _who(info: dict[str, Any]) -> str:
  if not info:
    return "another process"
  return (
    f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')}: "
    f"{info.get('command', '?')})"
  )


def _alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class RunLock:
  """An exclusive advisory lock on a run directory (see the module docstring).

  Use it as a context manager, or call :meth:`acquire` and :meth:`release`.

  Args:
    path: the lock file (``RunLayout(run_dir).lock``); its directory is created.

  Attributes:
    stale: the holder recorded in a lock file that no live process held when it was
      acquired (``{}`` when the file was new or released cleanly).
  """

  def __init__(self, path: str | os.PathLike[str]) -> None:
    self.path = Path(path)
    self.stale: dict[str, Any] = {}
    self._fd: int | None = None
    self._exclusive_file = False

  @property
  def held(self) -> bool:
    """Whether this object holds the lock."""
    return self._fd is not None

  def acquire(self) -> RunLock:
    """Takes the lock, or raises at once.

    Raises:
      RunLockedError: another live run holds it (the message names it and the file).
      OSError: the directory cannot be created or written.
    """
    if self._fd is not None:
      return self
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    except (FileNotFoundError, NotADirectoryError) as e:
      raise RunDirError(
        e.errno, f"{e.strerror} (the run directory cannot be created there)", e.filename
      ) from None
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      import fcntl

      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise RunLockedError(self._busy(_read(self.path))) from None
    except (ImportError, OSError) as e:  # No flock here (e.g. some network file systems).
      os.close(fd)
      if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
        raise
      return self._acquire_exclusive()
    previous = _read(self.path)
    if previous.get("pid") is not None and previous.get("released") is not True:
      self.stale = previous
    self._fd = fd
    self._write(fd)
    return self

  def _acquire_exclusive(self) -> RunLock:
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      info = _read(self.path)
      if info.get("released") is True or (
        info.get("host") == socket.gethostname() and not _alive(info.get("pid"))
      ):
        self.stale = {} if info.get("released") is True else info
        self.path.unlink(missing_ok=True)
        return self._acquire_exclusive()
      raise RunLockedError(
        self._busy(info) + f" If that run has stopped, delete {self.path} and start again."
      ) from None
    self._fd, self._exclusive_file = fd, True
    self._write(fd)
    return self

  def _busy(self, info: dict[str, Any]) -> str:
    return (
      f"{self.path.parent} is in use by {_who(info)}: one run writes into a run directory "
      f"at a time (lock {self.path}). Wait for it to finish, stop it, or choose another --out."
    )

  def _write(self, fd: int, extra: dict[str, Any] | None = None) -> None:
    data = (json.dumps({**_holder(), **(extra or {})}) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)

  def release(self) -> None:
    """Releases the lock (idempotent); the file stays, marked released."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      with contextlib.suppress(OSError):
        self._write(fd, {"released": True})
      if self._exclusive_file:
        with contextlib.suppress(OSError):
          self.path.unlink()
    finally:
      os.close(fd)  # Closing the descriptor releases the flock.

  def __enter__(self) -> RunLock:
    return self.acquire()

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
  ) -> None:
    self.release()
