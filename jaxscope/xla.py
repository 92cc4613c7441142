"""The XLA:CPU setting and the memory settings jaxscope installs on import.

Three process-wide defaults, the first two measured by ``benchmarks/xla_defaults.py``
(README, "Memory: XLA:CPU's scheduler and the compiler's freed memory"), the third by
``benchmarks/costs.py`` (README, "XLA:CPU options per step"):

1. **XLA:CPU's memory-minimising scheduler.** XLA:CPU orders a program's instructions
   with a breadth-first scheduler "optimized for concurrency" by default. In a step
   that runs several Hessian-vector products one after the other (the ``business`` and
   ``full`` instrument presets), it starts the products' tangent-independent work (the
   index arrays of every max-pool's backward pass, their zero-filled buffers) early, so
   that the buffers of all products are alive at once. The depth-first scheduler
   (``--xla_cpu_enable_concurrency_optimized_scheduler=false``) runs each product to its
   end first: on the 3c3d CNN at batch 128 the ``business`` step's XLA temporaries fall
   from 946 MB to 627 MB. The flag is read when the CPU backend starts, so it is added to
   ``XLA_FLAGS`` on import of jaxscope, and only then: if a JAX backend already runs,
   or ``XLA_FLAGS`` already names the flag (either value), nothing changes. GPU and TPU
   backends do not read it.
2. **Freed compiler memory returned to the system.** Compiling a large step allocates
   hundreds of MB in small blocks (600–1000 MB for the ``full`` preset on the 3c3d)
   that glibc's ``malloc`` keeps after the compiler frees them; the step's temporaries
   are then allocated on top, and the process's peak is their sum. After each backend
   compilation, ``malloc_trim(0)`` hands the free blocks back (under 1 ms, once per
   compilation). Linux with glibc only; elsewhere nothing is installed.
3. **A resident heap for the steps' temporaries.** XLA:CPU allocates a program's
   temporaries as one block on every call and frees it after. glibc's ``malloc`` serves a
   block over 32 MiB (its largest mmap threshold) with a fresh ``mmap`` and unmaps it on
   ``free``, so a step whose temporaries exceed 32 MiB faults every page of them in again
   on every call: the MNIST MLP's ``full`` instrument step (37.6 MiB) ran at 1.38× of its
   XLA floor program, and at 1.21–1.23× with the heap kept (``tests/test_xla_defaults.py``
   counts the page faults per call of a program with 49 MB of temporaries).
   ``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap and
   ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` keeps freed memory at its top, so the next
   call reuses the same pages. The process's peak barely moves (the 3c3d ``full`` step's
   1329 MB against 1277 MB without, separate runs); memory freed below the top is still
   returned after each compilation (default 2). Linux with glibc only, and not where the
   environment already sets glibc's malloc (``MALLOC_MMAP_MAX_``,
   ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
   ``glibc.malloc`` in ``GLIBC_TUNABLES``).

Two per-program options, not process defaults: each helps one workload and costs another,
and both are XLA:CPU debug options that :func:`jax.jit` takes for one program
(``compiler_options=``), so a step can have them without changing the process
(``benchmarks/compiler_options.py``, README "XLA:CPU options per step").
:func:`step_options` chooses them for a step from what it holds (a convolution, the
instruments' Hutchinson sums), as ``jaxscope train`` does by default:

* :data:`FEWER_COPIES`, copy insertion with region-based live ranges (XLA's GPU option,
  off on the CPU). Where the instruments' per-turn branches
  (:func:`jaxscope.metrics.hutchinson.streamed_estimate`) share a program with donated
  parameters, XLA:CPU's default analysis cannot order the branches against the in-place
  parameter update and copies the parameters and the previous update first; on the MNIST
  MLP the ``business`` step's temporaries are 51 MB with the copies and 25 MB without,
  under glibc's 32 MB limit for memory it keeps, so the step stops faulting fresh pages
  in on every call (106 against 84 ms). On the 3c3d CNN the same option raises the
  temporaries (355 to 611 MB for ``business``), and the MLP's bare SGD step is slower
  with it (6.8 against 5.5 ms).
* :data:`LEAN_COMPILE`, XLA:CPU's older elemental emitters in place of its MLIR fusion
  emitters. Compiling the 3c3d ``full`` step takes the process from 500 to 800 MB
  instead of 1770 MB (the run's peak 1320 against 1748 MB), and the 3c3d ``business``
  step runs 7 % faster; on the MNIST MLP the instruments' steps run 11–24 % slower.

The environment variable ``JAXSCOPE_XLA_DEFAULTS``, read on import, chooses: unset or
``1``, all three (unset: the flag only under a verified jaxlib, below); ``trim``, only the
release of compiler memory (XLA's own scheduler, which runs independent work side by
side: up to 10 % faster for the heavy presets, at the memory cost above); ``0``, none; or
a comma-separated list of the names :func:`defaults` reports (``scheduler_flag``,
``release_compiler_memory``, ``resident_heap``), e.g.
``JAXSCOPE_XLA_DEFAULTS=scheduler_flag,release_compiler_memory`` for glibc's own heap.
:func:`defaults` says what was applied.

XLA aborts the process on a flag it does not know (``Unknown flag in XLA_FLAGS``), and
its CPU flags come and go between releases. So when ``JAXSCOPE_XLA_DEFAULTS`` is unset,
the flag is added only under a jaxlib whose ``major.minor`` is in
:data:`VERIFIED_JAXLIB` (where it was checked to exist); ``JAXSCOPE_XLA_DEFAULTS=1``
adds it under any version.

Example:
  >>> import jaxscope
  >>> sorted(jaxscope.xla.defaults())
  ['release_compiler_memory', 'resident_heap', 'scheduler_flag']
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
  "DEFAULT_NAMES",
  "ENV_OPT_OUT",
  "FEWER_COPIES",
  "LEAN_COMPILE",
  "SCHEDULER_FLAG",
  "STEP_OPTIONS",
  "VERIFIED_JAXLIB",
  "apply_defaults",
  "compiler_options",
  "defaults",
  "has_convolution",
  "step_options",
]

#: The XLA:CPU flag jaxscope adds to ``XLA_FLAGS`` (see the module docstring).
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
#: The environment variable that chooses the defaults: unset, all (the flag only under a
#: jaxlib in :data:`VERIFIED_JAXLIB`); ``1``, all under any jaxlib; ``trim``, only the
#: release of compiler memory; ``0``, none; or a comma-separated list of
#: :data:`DEFAULT_NAMES`.
ENV_OPT_OUT = "JAXSCOPE_XLA_DEFAULTS"
#: The process defaults by name, as :func:`defaults` reports them.
DEFAULT_NAMES: tuple[str, ...] = ("scheduler_flag", "release_compiler_memory", "resident_heap")
#: glibc's ``mallopt`` parameters (``malloc.h``) and the trim threshold of the resident heap.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_RESIDENT_TRIM_THRESHOLD = 2**31 - 1
#: Environment variables through which a user sets glibc's malloc (then left alone).
_MALLOC_ENV = (
  "MALLOC_MMAP_MAX_",
  "MALLOC_MMAP_THRESHOLD_",
  "MALLOC_TRIM_THRESHOLD_",
  "MALLOC_TOP_PAD_",
)
#: The jaxlib ``(major, minor)`` versions whose XLA knows :data:`SCHEDULER_FLAG` (checked:
#: an unknown flag aborts the process when the backend starts).
VERIFIED_JAXLIB: tuple[tuple[int, int], ...] = ((0, 10),)
#: ``jax.jit(step, compiler_options=FEWER_COPIES)``: XLA:CPU's copy insertion with
#: region-based live ranges (see the module docstring; read by the CPU compiler only).
FEWER_COPIES: dict[str, Any] = {"xla_cpu_copy_insertion_use_region_analysis": True}
#: ``jax.jit(step, compiler_options=LEAN_COMPILE)``: XLA:CPU's elemental emitters in place
#: of its MLIR fusion emitters, for a smaller compilation (see the module docstring).
LEAN_COMPILE: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}
#: The per-program options by name (``jaxscope train --xla-options``).
STEP_OPTIONS: dict[str, dict[str, Any]] = {
  "fewer_copies": FEWER_COPIES,
  "lean_compile": LEAN_COMPILE,
}
#: jax's ``dispatch.BACKEND_COMPILE_EVENT`` (private there); a rename fails
#: ``tests/test_xla_defaults.py``, which checks that a compilation triggers the trim.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_applied: dict[str, bool] = dict.fromkeys(DEFAULT_NAMES, False)


def _backends_running() -> bool:
  """Whether a JAX backend has started (its flags are then fixed)."""
  try:
    from jax._src import xla_bridge
  except ImportError:  # pragma: no cover - private module moved: assume not started.
    return False
  check = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(check()) if check is not None else False


def _add_scheduler_flag(environ: Any) -> bool:
  """Appends :data:`SCHEDULER_FLAG` to ``environ["XLA_FLAGS"]`` unless it is named there."""
  flags = environ.get("XLA_FLAGS", "")
  name = SCHEDULER_FLAG.split("=", 1)[0]
  if name in flags or _backends_running():
    return False
  environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}".strip()
  return True


def _jaxlib_verified() -> bool:
  """Whether the installed jaxlib's ``major.minor`` is in :data:`VERIFIED_JAXLIB`."""
  try:
    parts = importlib.metadata.version("jaxlib").split(".")[:2]
    return (int(parts[0]), int(parts[1])) in VERIFIED_JAXLIB
  except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
    return False


def _libc() -> Any:
  """The C library (``None`` off Linux or where it cannot be loaded)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def _malloc_trim() -> Any:
  """glibc's ``malloc_trim`` (``None`` off Linux or where the C library has none, e.g. musl).

  Capping glibc's arenas as well (``mallopt(M_ARENA_MAX, 2)``) took another ~100 MB off
  the 3c3d full step's peak but made every step on the MNIST MLP 11–14 % slower (its
  threads then wait for each other's ``malloc``), so it is not done."""
  return getattr(_libc(), "malloc_trim", None)


def _keep_heap_resident(environ: Any, mallopt: Any = None) -> bool:
  """Default 3 of the module docstring: glibc's ``malloc`` serves every block from its
  heap and keeps freed memory at the top. Returns whether it was set."""
  if any(name in environ for name in _MALLOC_ENV):
    return False
  if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    return False
  mallopt = getattr(_libc(), "mallopt", None) if mallopt is None else mallopt
  if mallopt is None:
    return False
  # Trim threshold first: with it, a block freed at the top is never handed back.
  return bool(mallopt(_M_TRIM_THRESHOLD, _RESIDENT_TRIM_THRESHOLD)) and bool(
    mallopt(_M_MMAP_MAX, 0)
  )


def _install_trim(trim: Any = None) -> Any:
  """Registers a listener that calls ``trim(0)`` (default ``malloc_trim``) after each
  backend compilation; returns the listener, or ``None`` where there is no ``trim``."""
  trim = _malloc_trim() if trim is None else trim
  if trim is None:
    return None
  import jax.monitoring

  def after_compile(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _COMPILE_EVENT:
      trim(0)

  jax.monitoring.register_event_duration_secs_listener(after_compile)
  return after_compile


def _chosen(environ: Any) -> set[str]:
  """The defaults :data:`ENV_OPT_OUT` asks for (see the module docstring)."""
  choice = environ.get(ENV_OPT_OUT, "").strip().lower()
  if choice in ("", "1", "true", "yes", "on"):
    flag = choice != "" or _jaxlib_verified()
    return set(DEFAULT_NAMES) - (set() if flag else {"scheduler_flag"})
  if choice in ("0", "false", "no", "off"):
    return set()
  if choice == "trim":
    return {"release_compiler_memory"}
  names = {name.strip() for name in choice.split(",") if name.strip()}
  if not names or not names <= set(DEFAULT_NAMES):
    raise ValueError(
      f"{ENV_OPT_OUT} must be 1, trim, 0 or names from {', '.join(DEFAULT_NAMES)}, got {choice!r}."
    )
  return names


def apply_defaults(environ: Any = None) -> dict[str, bool]:
  """Applies the defaults of the module docstring once; returns :func:`defaults`.

  Args:
    environ: the environment to read and change (default ``os.environ``).

  Returns:
    ``{"scheduler_flag": bool, "release_compiler_memory": bool, "resident_heap": bool}``:
    what is in effect.

  Raises:
    ValueError: for a value of :data:`ENV_OPT_OUT` that names no choice.
  """
  environ = os.environ if environ is None else environ
  chosen = _chosen(environ)
  if "scheduler_flag" in chosen and not _applied["scheduler_flag"]:
    _applied["scheduler_flag"] = _add_scheduler_flag(environ)
  if "release_compiler_memory" in chosen and not _applied["release_compiler_memory"]:
    _applied["release_compiler_memory"] = _install_trim() is not None
  if "resident_heap" in chosen and not _applied["resident_heap"]:
    _applied["resident_heap"] = _keep_heap_resident(environ)
  return defaults()


def compiler_options(names: str | Sequence[str] | None) -> dict[str, Any] | None:
  """The ``compiler_options`` of :func:`jax.jit` for the named :data:`STEP_OPTIONS`.

  Args:
    names: option names (e.g. ``["lean_compile"]``), or ``None``/empty for none.

  Returns:
    The merged options, or ``None`` when no name is given (XLA's defaults).

  Raises:
    ValueError: for a name not in :data:`STEP_OPTIONS`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxscope import xla
    >>> f = jax.jit(jnp.sin, compiler_options=xla.compiler_options(["lean_compile"]))
    >>> float(f(0.0))
    0.0
  """
  if not names:
    return None
  out: dict[str, Any] = {}
  for name in [names] if isinstance(names, str) else names:
    if name not in STEP_OPTIONS:
      raise ValueError(
        f"xla options: unknown name {name!r}; expected some of {sorted(STEP_OPTIONS)}."
      )
    out.update(STEP_OPTIONS[name])
  return out


def defaults() -> dict[str, bool]:
  """What jaxscope changed on import: ``scheduler_flag`` (:data:`SCHEDULER_FLAG` added to
  ``XLA_FLAGS``), ``release_compiler_memory`` (the ``malloc_trim`` listener) and
  ``resident_heap`` (glibc's ``malloc`` keeps the steps' temporaries)."""
  return dict(_applied)


def step_options(*, convolutional: bool, hessian_sums: bool, platform: str = "cpu") -> list[str]:
  """The per-step options jaxscope chooses for a step (``jaxscope train``'s default).

  Each option is chosen where the benchmarks measured it to help and not where they
  measured it to cost (``benchmarks/compiler_options.py``, README "XLA:CPU options per
  step"):

  * ``lean_compile`` for a step with a convolution: on the 3c3d CNN every step was faster
    with it and its compilation took about half the memory (the ``full`` step's peak
    1320 against 1748 MB);
  * otherwise ``fewer_copies`` for a step with the instruments' Hutchinson sums
    (``hess_trace``, ``tic_diag``, ``tic_trace``), whose per-turn branches make XLA:CPU's
    default copy insertion copy the donated parameters: on the MNIST MLP the ``business``
    step 106 → 84 ms. Not for a convolutional step (its temporaries grow by 200–256 MB)
    nor for a step without those sums (the MLP's SGD step is slower with it);
  * nothing else, and nothing on another platform than the CPU (the options are XLA:CPU's,
    and measured there only): XLA's own.

  Args:
    convolutional: whether the step runs a convolution (:func:`has_convolution`).
    hessian_sums: whether it adds up Hutchinson probes in per-turn branches.
    platform: the backend the step runs on (``jax.default_backend()``).

  Returns:
    Names for :func:`compiler_options` (possibly none).

  Example:
    >>> from jaxscope import xla
    >>> xla.step_options(convolutional=False, hessian_sums=True)
    ['fewer_copies']
  """
  if platform != "cpu":
    return []
  if convolutional:
    return ["lean_compile"]
  return ["fewer_copies"] if hessian_sums else []


def has_convolution(fn: Any, *args: Any, **kwargs: Any) -> bool:
  """Whether ``fn(*args, **kwargs)`` runs a convolution (``conv_general_dilated``).

  ``fn`` is traced, not run (:func:`jax.make_jaxpr`; arrays or
  :class:`jax.ShapeDtypeStruct` as arguments), and its program searched, sub-programs of
  ``jit``, ``scan``, ``cond``, ``remat`` and custom derivatives included.

  Args:
    fn: a function of arrays (e.g. a model's ``apply`` or ``init``).
    *args: its arguments.
    **kwargs: its keyword arguments.

  Returns:
    ``True`` when a convolution is in its program.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxscope import xla
    >>> conv = lambda x: jax.lax.conv(x, jnp.ones((2, 1, 3, 3)), (1, 1), "SAME")
    >>> xla.has_convolution(conv, jnp.ones((1, 1, 8, 8)))
    True
    >>> xla.has_convolution(jnp.tanh, jnp.ones(3))
    False
  """
  import jax

  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _has_primitive(closed.jaxpr, "conv_general_dilated")


def _has_primitive(jaxpr: Any, name: str) -> bool:
  """Whether ``jaxpr`` or a program in its equations' parameters uses primitive ``name``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr's, or a Jaxpr itself.
        if hasattr(inner, "eqns") and _has_primitive(inner, name):
          return True
  return False
