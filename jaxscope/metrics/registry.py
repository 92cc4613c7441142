"""Metric names, presets and plugins.

Every built-in metric factory is registered under its name, so scopes and the command
line accept strings (``scope(grads=["norm", "variance"])``). Third-party packages add
metrics through the entry-point group ``jaxscope.metrics``: each entry point names a
zero-argument-callable factory returning a :class:`~jaxscope.metrics.Metric` (or a
:class:`~jaxscope.metrics.NetworkMetric`), e.g. in ``pyproject.toml``::

    [project.entry-points."jaxscope.metrics"]
    kurtosis = "my_package.metrics:kurtosis"
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any

from jaxscope.metrics import activations, network, spectral, stats
from jaxscope.metrics.base import Metric
from jaxscope.metrics.network import NetworkMetric

__all__ = [
  "ENTRY_POINT_GROUP",
  "SCOPE_PRESETS",
  "describe",
  "get",
  "names",
  "preset_metrics",
  "register",
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
  """The first line of the docstring of the metric registered as ``name`` ("" if none)."""
  _load_plugins()
  try:
    factory = _registry[name]
  except KeyError:
    raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(names())}.") from None
  doc = getattr(factory, "__doc__", None) or ""
  if getattr(factory, "__name__", "") == "<lambda>":
    doc = ""
  return doc.strip().split("\n")[0]


def get(name: str, **kwargs: Any) -> Metric | NetworkMetric:
  """Builds the metric registered as ``name``, passing ``kwargs`` to its factory."""
  _load_plugins()
  try:
    factory = _registry[name]
  except KeyError:
    raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(names())}.") from None
  metric = factory(**kwargs)
  if not isinstance(metric, Metric | NetworkMetric):
    raise TypeError(
      f"metric factory {name!r} returned {type(metric).__name__}, expected Metric or NetworkMetric."
    )
  return metric


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
  out["params"].append(spectral.spectral_norm(method="power", iters=1))
  out["updates"].extend(["realised_ratio", "lost_fraction"])
  return out


SCOPE_PRESETS: dict[str, Callable[[], dict[str, list[Any]]]] = {"economy": _economy, "full": _full}
"""Named metric sets, as keyword arguments of :func:`~jaxscope.metrics.scope`.

* ``economy``: norm, mean and variance of ``params``, ``grads`` and ``updates``, the
  update/weight ratio ``‖Δθ‖/‖θ‖`` per layer.
* ``full``: economy + 64-bin histograms of the three topics (of a strided sample of at
  most :data:`HISTOGRAM_SAMPLE` elements per leaf) + spectral norms of the
  kernels by warm-started power iteration (1 step = 2 matrix-vector products per
  training step, as ``torch.nn.utils.spectral_norm``) + the realised update/weight ratio
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
