"""The recorder of :func:`intercept`: Linen interception, the NNX patch, ``lax.scan`` bodies."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.extend import core as jex_core

from jaxscope.capture.layers import (
  ConvSpec,
  LayerCall,
  Pattern,
  _conv_spec,
  _kind,
  _linen_owns_params,
  _nnx_owns_params,
)
from jaxscope.tree import _compile

__all__ = ["Recording", "intercept"]


def _trace_state() -> Any:
  """The current JAX trace (an opaque value compared with ``==``), as Flax checks it."""
  return jex_core.get_opaque_trace_state(convention="flax")


def _twice(key: str) -> ValueError:
  return ValueError(
    f"capture: layer {key!r} was called more than once in one traced call (a shared "
    "layer, or a function that runs the model twice); capture records one output and "
    "one perturbation per layer. Exclude the layer (exclude=...) or run each forward "
    "pass in its own function."
  )


def _perturb(key: str, output: jax.Array, perturbations: Mapping[str, jax.Array]) -> jax.Array:
  if key not in perturbations:
    return output
  eps = perturbations[key]
  if tuple(jnp.shape(eps)) != tuple(output.shape):
    raise ValueError(
      f"capture: perturbations[{key!r}] has shape {tuple(jnp.shape(eps))}, expected the "
      f"layer output's shape {tuple(output.shape)}."
    )
  return output + eps.astype(output.dtype)


def _scan_length(xs: Any) -> int:
  leaves = jax.tree_util.tree_leaves(xs)
  if not leaves:
    raise ValueError("lax.scan: length must be given when xs has no leaves.")
  return int(jnp.shape(leaves[0])[0])


class _Frame:
  """The recordings of one ``lax.scan`` body trace (one iteration's layers)."""

  def __init__(self, home: Any, perturbations: Mapping[str, jax.Array], length: int) -> None:
    self.home = home
    self.length = length
    self.perturbations = dict(perturbations)
    self.outputs: dict[str, jax.Array] = {}
    self.inputs: dict[str, jax.Array] = {}
    self.modules: dict[str, Any] = {}

  def record(self, key: str, module: Any, args: tuple, output: jax.Array, inputs: bool) -> Any:
    if key in self.outputs:
      raise _twice(key)
    output = _perturb(key, output, self.perturbations)
    self.store(key, module, output, args[0] if inputs and args else None)
    return output

  def store(self, key: str, module: Any, output: jax.Array, inp: jax.Array | None) -> None:
    if key in self.outputs:
      raise _twice(key)
    self.outputs[key] = output
    self.modules[key] = module
    if inp is not None:
      self.inputs[key] = inp


class Recording:
  """Host-side recorder of one :func:`intercept` context (used only while tracing).

  Attributes:
    outputs: layer key -> the output returned to the model (``y_l + ε_l`` when a
      perturbation is given), in call order.
    inputs: layer key -> the first positional input (only with ``record_inputs``).
    kinds: layer key -> ``"dense"``, ``"conv"`` or ``"other"``.
    layers: layer key -> :class:`LayerCall`.
  """

  def __init__(
    self,
    perturbations: Mapping[str, jax.Array] | None,
    include: Pattern,
    exclude: Pattern,
    record_inputs: bool,
  ) -> None:
    self.outputs: dict[str, jax.Array] = {}
    self.inputs: dict[str, jax.Array] = {}
    self.kinds: dict[str, str] = {}
    self.convs: dict[str, ConvSpec] = {}
    self.layers: dict[str, LayerCall] = {}
    self.include = include
    self.exclude = exclude
    self._perturbations = dict(perturbations) if perturbations is not None else {}
    self._inc = _compile(include, "include")
    self._exc = _compile(exclude, "exclude")
    self._record_inputs = record_inputs
    # NNX: ids of the modules whose __call__ is running, and the paths of the current root.
    self._nnx_running: set[int] = set()
    self._nnx_paths: dict[int, str] | None = None
    self._nnx_roots: dict[int, Any] = {}
    # The trace the block runs in, and the open ``lax.scan`` bodies (innermost last).
    self._home = _trace_state()
    self._frames: list[_Frame] = []
    self.skipped: set[str] = set()
    """Keys of selected layers called in a nested trace that capture cannot export
    (``jax.checkpoint``/``nn.remat``, ``vmap``, a traced shape pass), left unrecorded."""

  def _selected(self, key: str) -> bool:
    if not key:
      return False  # The root module.
    if self._inc is not None and not any(p.search(key) for p in self._inc):
      return False
    return not (self._exc is not None and any(p.search(key) for p in self._exc))

  def _sink(self) -> _Frame | Recording | None:
    """Where a call made now is recorded: the innermost scan body or the block itself, if
    the call runs in its trace; ``None`` in any other nested trace."""
    state = _trace_state()
    if self._frames:
      frame = self._frames[-1]
      return frame if state == frame.home else None
    return self if state == self._home else None

  def _record(self, key: str, module: Any, args: tuple, output: Any) -> Any:
    if not isinstance(output, jax.Array):
      return output  # Tuples, dicts, None: not a single activation tensor.
    sink = self._sink()
    if sink is None:
      self.skipped.add(key)
      return output
    if sink is not self:
      return sink.record(key, module, args, output, self._record_inputs)
    if key in self.outputs:
      raise _twice(key)
    output = _perturb(key, output, self._perturbations)
    self._store(key, module, output, args[0] if self._record_inputs and args else None)
    return output

  def _store(self, key: str, module: Any, output: jax.Array, inp: jax.Array | None) -> None:
    self.outputs[key] = output
    kind = _kind(module)
    self.kinds[key] = kind
    if kind == "conv":
      spec = _conv_spec(module)
      if spec is not None:
        self.convs[key] = spec
    self.layers[key] = LayerCall(key, kind, module)
    if inp is not None:
      self.inputs[key] = inp

  # ------------------------------------------------------------------ lax.scan
  def _scan(
    self,
    original: Callable[..., Any],
    f: Callable[..., Any],
    init: Any,
    xs: Any,
    length: int | None,
    kwargs: dict,
  ) -> Any:
    """``lax.scan`` whose body's recorded layers leave the loop as stacked outputs."""
    sink = self._sink()
    if sink is None:  # A scan inside a nested trace: nothing there can be exported.
      return original(f, init, xs, length=length, **kwargs)
    n = length if length is not None else _scan_length(xs)
    given = sink.perturbations if isinstance(sink, _Frame) else self._perturbations
    taken = sink.outputs
    eps = {
      k: v for k, v in given.items() if k not in taken and jnp.ndim(v) >= 1 and jnp.shape(v)[0] == n
    }
    frames: list[_Frame] = []

    def body(carry: Any, packed: Any) -> Any:
      x, eps_i = packed
      frame = _Frame(_trace_state(), eps_i, n)
      frames.append(frame)
      self._frames.append(frame)
      try:
        carry, y = f(carry, x)
      finally:
        self._frames.pop()
      return carry, (y, dict(frame.outputs), dict(frame.inputs))

    carry, (ys, outs, ins) = original(body, init, (xs, eps), length=length, **kwargs)
    frame = frames[-1]
    for key, out in outs.items():
      module = frame.modules[key]
      if isinstance(sink, _Frame):
        sink.store(key, module, out, ins.get(key))
      else:
        if key in self.outputs:
          raise _twice(key)
        self._store(key, module, out, ins.get(key))
    return carry, ys

  # ------------------------------------------------------------------ Linen
  def _linen_interceptor(
    self, next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any
  ) -> Any:
    out = next_fun(*args, **kwargs)
    if not _ACTIVE or _ACTIVE[-1] is not self or context.method_name != "__call__":
      return out
    module = context.module
    key = "/".join(str(p) for p in module.path)
    if not self._selected(key) or not _linen_owns_params(module):
      return out
    return self._record(key, module, args, out)

  # ------------------------------------------------------------------ NNX
  def _nnx_call(self, original: Callable[..., Any], module: Any, args: tuple, kwargs: dict) -> Any:
    mid = id(module)
    if mid in self._nnx_running:  # super().__call__ of an overriding __call__.
      return original(module, *args, **kwargs)
    is_root = not self._nnx_running
    if is_root:
      self._nnx_roots = {}
      self._nnx_paths = {}
      for path, m in nnx.iter_modules(module):
        self._nnx_paths[id(m)] = "/".join(str(p) for p in path)
        self._nnx_roots[id(m)] = m
    paths = self._nnx_paths or {}
    key = paths.get(mid)
    if key is None and self._frames and self._nnx_paths is not None:
      key = self._nnx_scanned_key(module)
    self._nnx_running.add(mid)
    try:
      out = original(module, *args, **kwargs)
    finally:
      self._nnx_running.discard(mid)
      if is_root:
        self._nnx_paths = None
        self._nnx_roots = {}
    if key is None or not self._selected(key) or not _nnx_owns_params(module):
      return out
    return self._record(key, module, args, out)

  def _nnx_scanned_key(self, module: Any) -> str | None:
    """The path of ``module``, a copy made by ``nnx.scan`` of one layer of a stacked module.

    ``nnx.scan`` calls fresh module objects, one layer's slice of a module created with
    ``nnx.vmap``. Its path is that of the root's module of the same class whose
    parameters have the same shapes with the scan's length in front; with none or
    several such modules the layer is not recorded. Its submodules get paths under it.
    """
    n = self._frames[-1].length
    shapes = [tuple(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))]
    hits = []
    for mid, m in self._nnx_roots.items():
      if type(m) is not type(module):
        continue
      stacked = [tuple(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(m, nnx.Param))]
      if shapes and stacked == [(n, *s) for s in shapes]:
        hits.append(self._nnx_paths[mid])  # type: ignore[index]
    if len(hits) != 1:
      return None
    for path, sub in nnx.iter_modules(module):
      sub_key = "/".join([hits[0], *(str(p) for p in path)])
      self._nnx_paths[id(sub)] = sub_key  # type: ignore[index]
    return hits[0]

  def _check_perturbations_used(self) -> None:
    unused = sorted(set(self._perturbations) - set(self.outputs))
    if unused:
      raise ValueError(
        f"capture: perturbations given for layer(s) {unused} that were not recorded "
        f"(recorded: {list(self.outputs)}; include={self.include!r}, "
        f"exclude={self.exclude!r})."
      )


# The active recordings, innermost last. Only the innermost one records.
_ACTIVE: list[Recording] = []
# NNX classes patched while any context is active: class -> original __call__.
_PATCHED: dict[type, Callable[..., Any]] = {}


def _nnx_classes() -> list[type]:
  out, seen, stack = [], set(), [nnx.Module]
  while stack:
    cls = stack.pop()
    for sub in cls.__subclasses__():
      if sub not in seen:
        seen.add(sub)
        stack.append(sub)
        if inspect.isfunction(sub.__dict__.get("__call__")):
          out.append(sub)
  return out


def _make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(original)
  def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
    if not _ACTIVE:
      return original(self, *args, **kwargs)
    return _ACTIVE[-1]._nnx_call(original, self, args, kwargs)

  __call__._jaxscope_original = original  # type: ignore[attr-defined]
  return __call__


_ORIGINAL_SCAN: list[Callable[..., Any]] = []


def _patched_scan(
  f: Callable[..., Any], init: Any, xs: Any = None, length: int | None = None, **kwargs: Any
) -> Any:
  original = _ORIGINAL_SCAN[0]
  if not _ACTIVE:
    return original(f, init, xs, length=length, **kwargs)
  return _ACTIVE[-1]._scan(original, f, init, xs, length, kwargs)


def _patch_scan() -> None:
  if not _ORIGINAL_SCAN:
    _ORIGINAL_SCAN.append(jax.lax.scan)
    jax.lax.scan = _patched_scan  # type: ignore[assignment]


def _unpatch_scan() -> None:
  if _ORIGINAL_SCAN:
    jax.lax.scan = _ORIGINAL_SCAN.pop()  # type: ignore[assignment]


def _patch_nnx() -> None:
  for cls in _nnx_classes():
    if cls in _PATCHED:
      continue
    original = cls.__dict__["__call__"]
    _PATCHED[cls] = original
    cls.__call__ = _make_wrapper(original)  # type: ignore[method-assign]


def _unpatch_nnx() -> None:
  while _PATCHED:
    cls, original = _PATCHED.popitem()
    cls.__call__ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def intercept(
  *,
  perturbations: Mapping[str, jax.Array] | None = None,
  include: Pattern = None,
  exclude: Pattern = None,
  record_inputs: bool = False,
) -> Iterator[Recording]:
  """Records Flax layer calls made inside the block; optionally perturbs their outputs.

  Inside the block each recorded layer ``l`` (see the module docstring) returns
  ``y_l + perturbations[l]`` to the model when ``perturbations`` has its key, else
  ``y_l``; the :class:`Recording` collects the returned outputs (and, with
  ``record_inputs``, the first positional inputs) in call order. With zero
  perturbations ``ε``, ``∂L/∂ε_l = ∂L/∂y_l``.

  Must be used inside the traced (jitted / differentiated) function. Nested contexts
  are allowed; only the innermost records. Not thread-safe (the NNX patch is global).

  Args:
    perturbations: layer key -> array of the layer output's shape, added to the output.
    include: regular expression(s) on layer keys (``re.search``); ``None`` = all.
    exclude: regular expression(s) of layer keys to leave out.
    record_inputs: also record each layer's first positional input.

  Yields:
    The :class:`Recording`, filled while the model runs.

  Raises:
    ValueError: a recorded layer is called twice; a perturbation has the wrong shape;
      (on normal exit) a perturbation names a layer that was not recorded.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxscope import capture
    >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> with capture.intercept() as rec:
    ...   y = model.apply({"params": params}, x)
    >>> {k: v.shape for k, v in rec.outputs.items()}
    {'layers_0': (4, 3), 'layers_2': (4, 2)}
  """
  if perturbations is not None and not isinstance(perturbations, Mapping):
    raise TypeError(
      "intercept: perturbations must be a mapping {layer key: array}, "
      f"got {type(perturbations).__name__}."
    )
  rec = Recording(perturbations, include, exclude, record_inputs)
  first = not _ACTIVE
  _ACTIVE.append(rec)
  try:
    if first:
      _patch_nnx()
      _patch_scan()
    with nn.intercept_methods(rec._linen_interceptor):
      yield rec
  finally:
    _ACTIVE.remove(rec)
    if not _ACTIVE:
      _unpatch_nnx()
      _unpatch_scan()
  rec._check_perturbations_used()
