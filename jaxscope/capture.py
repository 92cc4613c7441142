"""Layer outputs, inputs and ``∂L/∂(layer output)`` from Flax models, model code untouched.

Two entry points:

* :func:`intercept`: a context manager, used *inside* the traced function, that observes
  every ``__call__`` of a Flax Linen module (through ``flax.linen.intercept_methods``) and
  of a Flax NNX module (through a temporary patch of the NNX module classes), records the
  outputs ``y_l`` (and optionally the first positional inputs) of the recorded layers, and
  returns ``y_l + ε_l`` to the model when a perturbation ``ε_l`` is given for layer ``l``.
* :func:`value_and_grad`: ``jax.value_and_grad`` that also returns the captured outputs
  and, per layer, ``∂L/∂y_l = ∂L(θ, ε)/∂ε_l |_{ε=0}`` (the gradient w.r.t. a zero
  perturbation added to the layer's output, the recipe of jax-notes §2).

Which calls are recorded: the modules that directly own parameters (Linen: the module's
own ``params`` collection has array leaves of its own, e.g. ``Dense``, ``Conv``,
``BatchNorm``; NNX: the module has ``nnx.Param`` attributes), except the root module,
then filtered by ``include`` / ``exclude`` regular expressions (``re.search`` on the
layer key, as :func:`jaxscope.tree.layout`). Only ``__call__`` is recorded, and only
calls whose output is a single array.

Layer keys are ``'/'``-joined module paths and match the parameter names' prefixes:
Linen ``"Dense_0"``, ``"Block_0/Conv_1"`` (``module.path``); NNX the attribute path from
the root, ``"linear1"``, ``"blocks/0/conv"``, the prefixes of
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` joined with ``'/'``.

Pitfalls:

* Interception acts at **trace time**. The ``with intercept(...)`` block (or the call of
  :func:`value_and_grad`) must sit *inside* the function you ``jit`` / ``grad``; a jitted
  ``model.apply`` that JAX has already compiled does not see an interceptor set up
  outside it (jax-notes §2).
* The NNX patch replaces ``__call__`` on every ``nnx.Module`` subclass that defines it
  (its own ``__dict__``) while a context is active, and restores the original functions
  in a ``finally``. It is process-global: do not trace two intercepted functions
  concurrently from several threads. Classes defined while a context is active are not
  patched. For NNX the key of a module is found from the *outermost* NNX call (the root:
  its ``nnx.iter_modules`` paths), so a layer called directly, outside its model, is
  its own root and is not recorded.
* "Output" is what the module's ``__call__`` returns. ``Dense`` / ``Conv`` followed by a
  functional activation (``x = nn.relu(nn.Dense(8)(x))``) is captured **before** the
  activation (the pre-activation). Activation *modules* own no parameters, so they are
  not recorded either. Outputs that are not a single array (tuples, dicts) are skipped.
* The root module is never a layer: a bare ``nn.Dense`` used as the whole model records
  nothing (wrap it in a module).
* A layer called twice in one traced call (a shared layer, or ``fn`` running the model
  twice) raises ``ValueError``: one output and one perturbation per layer is all that
  the key scheme can express. Run each forward pass in its own function.
* **Layer-stacked models** (``nn.scan``, ``nnx.scan`` over ``nnx.vmap``-created layers,
  or any ``jax.lax.scan`` over layers): while a context is active ``jax.lax.scan`` is
  replaced by a wrapper that carries the body's recorded outputs (and inputs) out as
  scan outputs and feeds perturbations in as scanned inputs, so a layer inside the loop
  is recorded once with a leading layer axis: ``"blocks/fc"`` of shape ``[L, B, …]``
  (and ``∂L/∂y`` of that shape). Measure it per layer with
  ``scope(..., stacked={"^blocks": 0})``. Inside ``nnx.scan`` the called modules are
  copies; each gets the path of the root's module of the same class whose parameters
  have the scan's length in front (none or several: not recorded).
* Layers called in any *other* nested trace (``jax.checkpoint`` / ``nn.remat``,
  ``vmap``, Flax's shape-only passes) cannot be exported from it: they are left out
  and listed in :attr:`Recording.skipped`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.extend import core as jex_core

from jaxscope.tree import _compile

__all__ = ["Captured", "ConvSpec", "LayerCall", "Recording", "intercept", "value_and_grad"]


class ConvSpec(NamedTuple):
  """A captured convolution's hyperparameters (static), for per-example gradients."""

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  """``"SAME"``, ``"VALID"`` or explicit ``(low, high)`` pairs per spatial axis."""
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int


def _tuple(v: Any, nd: int) -> tuple[int, ...] | None:
  if v is None:
    return (1,) * nd
  if isinstance(v, int):
    return (v,) * nd
  try:
    out = tuple(int(a) for a in v)
  except TypeError:
    return None
  return out if len(out) == nd else None


def _conv_spec(module: Any) -> ConvSpec | None:
  """The hyperparameters of a Linen/NNX ``Conv``; ``None`` for unsupported settings."""
  try:
    ks = tuple(int(k) for k in module.kernel_size)
  except (AttributeError, TypeError):
    return None
  nd = len(ks)
  strides = _tuple(getattr(module, "strides", None), nd)
  in_dil = _tuple(getattr(module, "input_dilation", None), nd)
  k_dil = _tuple(getattr(module, "kernel_dilation", None), nd)
  groups = int(getattr(module, "feature_group_count", 1) or 1)
  pad = getattr(module, "padding", "SAME")
  if isinstance(pad, str):
    padding: Any = pad.upper() if pad.upper() in ("SAME", "VALID") else None
  elif isinstance(pad, int):
    padding = ((pad, pad),) * nd
  else:
    try:
      items = list(pad)
      if all(isinstance(a, int) for a in items):
        padding = tuple((int(a), int(a)) for a in items)
      else:
        padding = tuple((int(a), int(b)) for a, b in items)
    except (TypeError, ValueError):
      padding = None
    if padding is not None and len(padding) != nd:
      padding = None
  if None in (strides, in_dil, k_dil, padding):
    return None
  return ConvSpec(ks, strides, padding, in_dil, k_dil, groups)  # type: ignore[arg-type]


class LayerCall(NamedTuple):
  """One recorded layer."""

  key: str
  """The layer name: ``'/'``-joined module path (``"Dense_0"``, ``"blocks/0/conv"``)."""
  kind: str
  """``"dense"`` (``linen.Dense``, ``nnx.Linear``), ``"conv"`` (``linen.Conv``,
  ``nnx.Conv``) or ``"other"``."""
  module: Any
  """The module object (Linen bound module or NNX module), for introspection only."""


class Captured(NamedTuple):
  """What :func:`value_and_grad` captured, keyed by layer key."""

  outputs: dict[str, jax.Array]
  """Each layer's output ``y_l`` (its activations)."""
  inputs: dict[str, jax.Array]
  """Each layer's first positional input (only with ``inputs=True``, else ``{}``)."""
  grads: dict[str, jax.Array]
  """``∂L/∂y_l`` of the differentiated scalar (only with ``layer_grads=True``, else ``{}``)."""
  kinds: dict[str, str]
  """Each layer's kind (see :class:`LayerCall`). Static: a dict that is a pytree node
  without leaves, so ``Captured`` can be returned from ``jit``."""
  convs: dict[str, ConvSpec] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)
  """The :class:`ConvSpec` of each ``"conv"`` layer with supported settings (static)."""


Pattern = str | Sequence[str] | None


class _Kinds(dict):
  """A ``dict[str, str]`` that is a pytree *without leaves* (the items are static).

  So a :class:`Captured` can be returned from ``jit`` and pass through ``jax.tree.map``
  with its kinds intact.
  """


jax.tree_util.register_pytree_node(
  _Kinds, lambda d: ((), tuple(d.items())), lambda items, _: _Kinds(items)
)


def _kind(module: Any) -> str:
  if isinstance(module, nn.Dense | nnx.Linear):
    return "dense"
  if isinstance(module, nn.Conv | nnx.Conv):
    return "conv"
  return "other"


def _linen_owns_params(module: nn.Module) -> bool:
  try:
    params = module.variables.get("params", {})
  except Exception:  # An unbound module or a scope without variables.
    return False
  return any(not isinstance(v, Mapping) for v in params.values())


def _nnx_owns_params(module: nnx.Module) -> bool:
  return any(isinstance(v, nnx.Param) for v in vars(module).values())


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


def _no_layer_error(include: Pattern, exclude: Pattern) -> ValueError:
  return ValueError(
    "capture.value_and_grad: no layer was recorded (include="
    f"{include!r}, exclude={exclude!r}). fn must call a Flax Linen module (model.apply) "
    "or an NNX module inside it, the recorded layers are the non-root modules that own "
    "parameters, and include/exclude must leave at least one of them."
  )


def value_and_grad(
  fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  include: Pattern = None,
  exclude: Pattern = None,
  layer_grads: bool = True,
  inputs: bool = False,
) -> Callable[..., tuple[Any, Any, Captured]]:
  """``jax.value_and_grad(fn)`` that also captures layer outputs and ``∂L/∂(output)``.

  ``value_and_grad(fn)(params, *args, **kwargs)`` returns ``(value, grads, captured)``:
  ``value = fn(params, *args, **kwargs)`` (``(loss, aux)`` with ``has_aux``),
  ``grads = ∂loss/∂params`` exactly as ``jax.value_and_grad(fn, has_aux=has_aux)``, and
  a :class:`Captured` with each recorded layer's output ``y_l``, optionally its input,
  and with ``layer_grads`` ``∂loss/∂y_l = ∂loss(θ, ε)/∂ε_l`` at ``ε = 0``, where
  ``y_l + ε_l`` replaces the layer's output.

  Cost: ``fn`` is traced twice (a ``jax.eval_shape`` pass learns the layers and their
  output shapes) when ``layer_grads``; the compiled program is one forward and one
  backward pass that also returns the activations, as plain ``jax.value_and_grad``.
  Use it inside the jitted step; ``fn`` calls the model normally (``model.apply(...)``,
  an NNX module held by closure, or ``nnx.merge`` inside ``fn``).

  Args:
    fn: ``fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
      ``loss`` a real scalar.
    has_aux: whether ``fn`` returns ``(loss, aux)``.
    include: regular expression(s) on layer keys (``re.search``); ``None`` = all.
    exclude: regular expression(s) of layer keys to leave out.
    layer_grads: also compute ``∂loss/∂y_l`` per layer.
    inputs: also record each layer's first positional input.

  Returns:
    A function of ``(params, *args, **kwargs)`` returning ``(value, grads, captured)``.

  Raises:
    TypeError: if ``fn`` is not callable.
    ValueError: (when called) if no layer was recorded, naming include/exclude; see
      also :func:`intercept`.
  """
  if not callable(fn):
    raise TypeError(f"capture.value_and_grad: fn must be callable, got {type(fn).__name__}.")
  _compile(include, "include")  # Fail early on an invalid pattern.
  _compile(exclude, "exclude")

  def split(out: Any) -> tuple[Any, Any]:
    if not has_aux:
      return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(
        "capture.value_and_grad: with has_aux=True, fn must return a pair (loss, aux), "
        f"got {type(out).__name__}."
      )
    return out

  def wrapped(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Captured]:
    kinds: dict[str, str] = {}
    convs: dict[str, ConvSpec] = {}

    def inner(p: Any, eps: dict[str, jax.Array] | None) -> tuple[Any, Any]:
      with intercept(
        perturbations=eps, include=include, exclude=exclude, record_inputs=inputs
      ) as rec:
        out = fn(p, *args, **kwargs)
      if not rec.outputs:
        raise _no_layer_error(include, exclude)
      kinds.clear()
      kinds.update(rec.kinds)
      convs.clear()
      convs.update(rec.convs)
      loss, aux = split(out)
      return loss, (aux, dict(rec.outputs), dict(rec.inputs))

    if layer_grads:

      def discover(p: Any) -> dict[str, jax.Array]:
        with intercept(include=include, exclude=exclude) as rec:
          fn(p, *args, **kwargs)
        return dict(rec.outputs)

      shapes = jax.eval_shape(discover, params)
      if not shapes:
        raise _no_layer_error(include, exclude)
      eps0 = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
      (loss, (aux, outs, ins)), (grads, lgrads) = jax.value_and_grad(
        inner, argnums=(0, 1), has_aux=True
      )(params, eps0)
    else:
      (loss, (aux, outs, ins)), grads = jax.value_and_grad(inner, has_aux=True)(params, None)
      lgrads = {}
    value = (loss, aux) if has_aux else loss
    return value, grads, Captured(outs, ins, dict(lgrads), _Kinds(kinds), _Kinds(convs))

  return wrapped
