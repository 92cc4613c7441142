"""Metric names, presets and plugins.

Every built-in metric factory is registered under its name, so scopes and the command
line accept strings (``scope(grads=["norm", "variance"])``), with arguments as Python
literals where the factory takes any (``"variance(ddof=1)"``, ``"norm(1)"``,
``"spectral_norm(method='power')"``; :func:`parse_spec`). Third-party packages add
metrics through the entry-point group ``jaxscope.metrics``: each entry point names a
zero-argument-callable factory returning a :class:`~jaxscope.metrics.Metric` (or a
:class:`~jaxscope.metrics.NetworkMetric`), e.g. in ``pyproject.toml``::

    [project.entry-points."jaxscope.metrics"]
    kurtosis = "my_package.metrics:kurtosis"
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxscope.metrics import activations, network, spectral, stats
from jaxscope.metrics.base import Metric, evaluate
from jaxscope.metrics.network import NetworkMetric

__all__ = [
  "ENTRY_POINT_GROUP",
  "NOTES",
  "SCOPE_PRESETS",
  "MetricInfo",
  "describe",
  "get",
  "info",
  "keys_of",
  "names",
  "parse_spec",
  "preset_metrics",
  "register",
  "split_specs",
]

ENTRY_POINT_GROUP = "jaxscope.metrics"

Factory = Callable[..., Metric | NetworkMetric]


def _norm1() -> Metric:
  """L1 norm ``‖x‖₁ = Σ|x_i|`` per layer (``norm(1)``)."""
  return stats.norm(1)


def _norminf() -> Metric:
  """Max norm ``‖x‖_∞ = max|x_i|`` per layer (``norm("inf")``)."""
  return stats.norm("inf")


_BUILTIN: dict[str, Factory] = {
  "mean": stats.mean,
  "sum": stats.total,
  "variance": stats.variance,
  "norm": stats.norm,
  "norm1": _norm1,
  "norminf": _norminf,
  "rms": stats.rms,
  "max_abs": stats.max_abs,
  "zero_fraction": stats.zero_fraction,
  "nonfinite_fraction": stats.nonfinite_fraction,
  "ratio": stats.ratio_to_params,
  "elementwise_ratio": stats.elementwise_ratio,
  "realised_ratio": stats.realised_ratio,
  "lost_fraction": stats.lost_fraction,
  "histogram": stats.histogram,
  "spectral_norm": spectral.spectral_norm,
  "condition_number": spectral.condition_number,
  "std": activations.activation_std,
  "dead_fraction": activations.dead_fraction,
  "saturation_fraction": activations.saturation_fraction,
  "loss": network.loss,
  "accuracy": network.accuracy,
}

_registry: dict[str, Factory] = dict(_BUILTIN)
_plugins_loaded = False


def register(name: str, factory: Factory, *, overwrite: bool = False) -> None:
  """Registers ``factory`` (called with no arguments by name lookups) as ``name``."""
  if not callable(factory):
    raise TypeError(f"register: factory for {name!r} must be callable, got {factory!r}.")
  if name in _registry and not overwrite:
    raise ValueError(f"register: a metric named {name!r} exists; pass overwrite=True.")
  _registry[name] = factory


def _load_plugins() -> None:
  global _plugins_loaded
  if _plugins_loaded:
    return
  _plugins_loaded = True
  for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
    if ep.name in _registry:
      warnings.warn(
        f"jaxscope plugin {ep.value!r} ignored: metric {ep.name!r} already exists.", stacklevel=2
      )
      continue
    try:
      _registry[ep.name] = ep.load()
    except Exception as e:  # A broken plugin must not break jaxscope.
      warnings.warn(f"jaxscope plugin {ep.name}={ep.value!r} failed to load: {e}", stacklevel=2)


def names() -> list[str]:
  """All metric names: built-ins, registered and plugin metrics."""
  _load_plugins()
  return sorted(_registry)


def describe(name: str) -> str:
  """The first paragraph of the docstring of the metric registered as ``name``, as one
  line ("" if none)."""
  _load_plugins()
  try:
    factory = _registry[name]
  except KeyError:
    raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(names())}.") from None
  doc = getattr(factory, "__doc__", None) or ""
  if getattr(factory, "__name__", "") == "<lambda>":
    doc = ""
  return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


def parse_spec(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """Splits a metric spec ``"name"`` or ``"name(arg, …, key=value, …)"`` into
  ``(name, args, kwargs)``; the arguments are Python literals (numbers, strings, ``None``,
  ``True``/``False``, tuples, lists).

  Example:
    >>> parse_spec("variance(ddof=1)")
    ('variance', (), {'ddof': 1})
    >>> parse_spec("histogram(32, range=(-1.0, 1.0))")
    ('histogram', (32,), {'range': (-1.0, 1.0)})
  """
  text = spec.strip()
  if "(" not in text and ")" not in text:
    return text, (), {}
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    node = None
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
    raise ValueError(
      f"metric spec {spec!r}: expected NAME or NAME(arguments), e.g. 'variance(ddof=1)'."
    )
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {}
    for k in node.keywords:
      if k.arg is None:
        raise ValueError("**")
      kwargs[k.arg] = ast.literal_eval(k.value)
  except ValueError:
    raise ValueError(
      f"metric spec {spec!r}: arguments must be Python literals (numbers, strings, None, "
      "True/False, tuples), given positionally or as key=value."
    ) from None
  return node.func.id, args, kwargs


def split_specs(text: str) -> list[str]:
  """Splits a comma list of metric specs at the commas outside parentheses:
  ``"norm,histogram(32, range=(-1, 1))"`` → ``["norm", "histogram(32, range=(-1, 1))"]``."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(text):
    if c in "([":
      depth += 1
    elif c in ")]":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _factory(name: str) -> Factory:
  _load_plugins()
  try:
    return _registry[name]
  except KeyError:
    raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(names())}.") from None


def get(name: str, **kwargs: Any) -> Metric | NetworkMetric:
  """Builds the metric registered as ``name``, passing ``kwargs`` to its factory.

  ``name`` may carry arguments, ``"variance(ddof=1)"`` (:func:`parse_spec`); ``kwargs``
  are added to them.
  """
  base, args, spec_kwargs = parse_spec(name)
  factory = _factory(base)
  try:
    metric = factory(*args, **{**spec_kwargs, **kwargs})
  except TypeError as e:
    raise ValueError(f"metric {name!r}: {e} (signature: {base}{_signature(factory)}).") from None
  if not isinstance(metric, Metric | NetworkMetric):
    raise TypeError(
      f"metric factory {name!r} returned {type(metric).__name__}, expected Metric or NetworkMetric."
    )
  return metric


def _signature(factory: Factory) -> str:
  """``(ddof=0)``: the factory's parameters with their defaults ("" when unknown)."""
  try:
    sig = inspect.signature(factory)
  except (TypeError, ValueError):
    return ""
  parts = []
  for p in sig.parameters.values():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
  return f"({', '.join(parts)})"


#: Conventions and estimators of the built-in metrics that their first docstring line
#: does not say (shown by ``jaxscope list-metrics``).
NOTES: dict[str, str] = {
  "variance": "ddof=0 by default: the population variance (numpy's default); ikkuna's "
  "torch.var used ddof=1 (the unbiased sample variance): variance(ddof=1).",
  "std": "population standard deviation (ddof=0), over batch, positions and units.",
  "spectral_norm": "exact (SVD) for kernels of at most svd_max_size=4096 elements; above, "
  "warm-started power iteration with spectral_norm_residual r = ‖Wᵀu − σv‖ "
  "(σ ≤ σ_max ≤ σ + r once converged; some singular value within r of σ always). "
  "Kernels only, as the matrix [fan_in, fan_out].",
  "condition_number": "exact (SVD): σ_max/σ_min of the [fan_in, fan_out] matrix; inf when "
  "rank-deficient.",
  "ratio": "denominator 'old': the parameters before this step's update.",
  "elementwise_ratio": "ikkuna's mean |Δθᵢ/θᵢ| over elements with θᵢ ≠ 0.",
  "norm": "ℓ₂ by default; norm(1), norm('inf') (also registered as norm1, norminf).",
}


class MetricInfo(NamedTuple):
  """What ``jaxscope list-metrics`` shows of a registered metric (:func:`info`)."""

  name: str
  signature: str
  """The factory's parameters with their defaults, e.g. ``"(ddof=0)"``."""
  summary: str
  """The first paragraph of the factory's docstring (:func:`describe`)."""
  keys: tuple[str, ...]
  """Output key patterns with the defaults: ``{topic}/variance/{layer}``, or the plain key
  of a network metric."""
  note: str
  """Conventions and estimator (:data:`NOTES`), or ""."""


def keys_of(metric: Metric | NetworkMetric) -> tuple[str, ...]:
  """The output key patterns of ``metric`` (``{topic}/{stat}/{layer}``, or the plain key of
  a network metric), from the structure of its value on a 72×64 kernel (large enough for
  the power-iteration path of ``spectral_norm``, which adds a residual key)."""
  if isinstance(metric, NetworkMetric):
    return (metric.name,)
  tree = {"kernel": jax.ShapeDtypeStruct((72, 64), jax.numpy.float32)}
  try:
    value = jax.eval_shape(lambda t: evaluate(metric, t, reference=t), tree)
  except Exception:  # A plugin that does not take a kernel: the plain pattern.
    value = None
  if isinstance(value, dict):
    return tuple(f"{{topic}}/{metric.name}_{part}/{{layer}}" for part in value)
  return (f"{{topic}}/{metric.name}/{{layer}}",)


def info(name: str) -> MetricInfo:
  """The signature, summary, output keys (with the default arguments) and conventions of
  the metric registered as ``name``."""
  factory = _factory(name)
  return MetricInfo(
    name, _signature(factory), describe(name), keys_of(get(name)), NOTES.get(name, "")
  )


def _economy() -> dict[str, list[Any]]:
  moments = ["norm", "mean", "variance"]
  return {
    "params": list(moments),
    "grads": list(moments),
    "updates": [*moments, "ratio"],
  }


#: Histograms in the ``full`` preset count a strided sample of at most this many
#: elements per leaf (exact below it): exact counting is a serial scatter-add on CPU.
HISTOGRAM_SAMPLE = 65536


def _full() -> dict[str, list[Any]]:
  out = _economy()
  for topic in ("params", "grads", "updates"):
    out[topic].append(stats.histogram(64, max_elements=HISTOGRAM_SAMPLE))
  out["params"].append(spectral.spectral_norm())
  out["updates"].extend(["realised_ratio", "lost_fraction"])
  return out


SCOPE_PRESETS: dict[str, Callable[[], dict[str, list[Any]]]] = {"economy": _economy, "full": _full}
"""Named metric sets, as keyword arguments of :func:`~jaxscope.metrics.scope`.

* ``economy``: norm, mean and variance of ``params``, ``grads`` and ``updates``, the
  update/weight ratio ``‖Δθ‖/‖θ‖`` per layer.
* ``full``: economy + 64-bin histograms of the three topics (of a strided sample of at
  most :data:`HISTOGRAM_SAMPLE` elements per leaf) + spectral norms of the kernels
  (:func:`~jaxscope.metrics.spectral_norm` with its defaults: exact SVD up to 4096
  elements, above a warm-started power iteration, converged on the first step and
  reported with its residual ``params/spectral_norm_residual/{layer}``) + the realised
  update/weight ratio
  and the fraction of lost updates (:func:`~jaxscope.metrics.realised_ratio`,
  :func:`~jaxscope.metrics.lost_fraction`: what ``apply_updates`` stores in the
  parameters' dtype, e.g. bfloat16).
"""


def preset_metrics(name: str) -> dict[str, list[Any]]:
  """Returns the metric lists of the preset ``name`` (``"economy"`` or ``"full"``)."""
  try:
    return SCOPE_PRESETS[name]()
  except KeyError:
    raise KeyError(f"unknown preset {name!r}; presets: {', '.join(SCOPE_PRESETS)}.") from None
