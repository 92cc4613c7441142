"""What the instruments can measure, the presets, and the settings of one instance."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxscope import tree as jtree

__all__ = [
  "HUTCHINSON_QUANTITIES",
  "INSTRUMENT_PRESETS",
  "QUANTITIES",
  "Config",
  "leaf_names",
  "leaf_norms",
  "num_params",
  "update_side",
  "value_specs",
]

F32 = jnp.float32

#: Every quantity and a one-line description (Cockpit's name in brackets).
QUANTITIES: dict[str, str] = {
  "loss": "mini-batch loss, the mean of the individual losses [Loss]",
  "grad_norm": "ℓ₂ norm of the mini-batch gradient per leaf [GradNorm]",
  "distance": "ℓ₂ distance of each leaf from its value at init() [Distance]",
  "update_size": "ℓ₂ norm of the update per leaf [UpdateSize]",
  "alpha": "normalised step length α of the previous update (noise-aware quadratic fit) [Alpha]",
  "norm_test": "largest θ passing the norm test, Byrd et al. 2012 [NormTest]",
  "inner_test": "largest θ passing the inner-product test, Bollapragada et al. 2017 [InnerTest]",
  "ortho_test": "largest ν passing the orthogonality test, Bollapragada et al. 2017 [OrthoTest]",
  "grad_hist_1d": "histogram of per-example gradient entries [GradHist1d]",
  "grad_hist_2d": "2-D histogram of per-example gradient entries vs parameters [GradHist2d]",
  "hess_trace": "Hessian trace, total and per leaf, exact or Hutchinson ± stderr [HessTrace]",
  "tic_diag": "Takeuchi information criterion with the Hessian diagonal, ± stderr [TICDiag]",
  "tic_trace": "Takeuchi information criterion from traces, ± stderr [TICTrace]",
  "hess_max_ev": "largest-magnitude Hessian eigenvalue, warm-started, ± residual [HessMaxEV]",
  "mean_gsnr": "mean gradient signal-to-noise ratio, Liu et al. 2020 [MeanGSNR]",
  "cabs": "CABS batch-size suggestion, Balles et al. 2017 (SGD without momentum) [CABS]",
  "early_stopping": "evidence-based early stopping, Mahsereci et al. 2017 [EarlyStopping]",
  "grad_variance": "per-leaf mean of the per-example gradient variance and second moment",
  "per_example_norms": "mean and max of the per-example gradient norms ‖gᵢ‖",
}

_ECONOMY = (
  "alpha",
  "distance",
  "grad_hist_1d",
  "grad_norm",
  "inner_test",
  "loss",
  "norm_test",
  "ortho_test",
  "update_size",
)
#: Cockpit's configurations (``cockpit.utils.configuration``), quantity for quantity.
INSTRUMENT_PRESETS: dict[str, tuple[str, ...]] = {
  "economy": _ECONOMY,
  "business": (*_ECONOMY, "tic_diag", "hess_trace"),
  "full": (*_ECONOMY, "tic_diag", "hess_trace", "hess_max_ev", "grad_hist_2d"),
}

_SECOND_MOMENT = {"tic_diag", "tic_trace", "mean_gsnr", "cabs", "early_stopping", "grad_variance"}
_SQ_NORMS = {"norm_test", "ortho_test", "per_example_norms"}
_HIST = {"grad_hist_1d", "grad_hist_2d"}
_HUTCHINSON = {"hess_trace", "tic_diag", "tic_trace"}
#: The quantities estimated from Hutchinson probes, whose sums a step adds up in a branch
#: per turn on the CPU (:func:`jaxscope.metrics.hutchinson.streamed_estimate`).
HUTCHINSON_QUANTITIES: frozenset[str] = frozenset(_HUTCHINSON)
_PROJ_GRAD = {"inner_test", "ortho_test"}
_SCALARS = (
  "loss",
  "alpha",
  "norm_test",
  "inner_test",
  "ortho_test",
  "tic_diag",
  "tic_trace",
  "hess_trace",
  "hess_max_ev",
  "mean_gsnr",
  "cabs",
  "early_stopping",
)
#: The error bar reported next to a stochastic or warm-started quantity: ``{q}{suffix}``.
_ERROR_BARS = {
  "hess_trace": "_stderr",
  "tic_diag": "_stderr",
  "tic_trace": "_stderr",
  "hess_max_ev": "_residual",
}
_PER_LEAF = {
  "grad_norm": ("cockpit/grad_norm",),
  "distance": ("cockpit/distance",),
  "update_size": ("cockpit/update_size",),
  "hess_trace": ("hessian/trace",),
  "grad_variance": ("per_example_grads/variance", "per_example_grads/second_moment"),
}
_UPDATE_SIDE = ("cockpit/distance/", "cockpit/update_size/")


@dataclasses.dataclass(frozen=True)
class Config:
  """The checked settings of :func:`~jaxscope.metrics.instruments` (see its arguments)."""

  quantities: tuple[str, ...]
  every: int
  capture_layers: bool | None
  include: str | Sequence[str] | None
  exclude: str | Sequence[str] | None
  chunk: int
  hist_bins: int
  hist2d_bins: tuple[int, int]
  hist_sample: int
  hist_range: Any
  hist2d_range: Any
  hutchinson_probes: int
  max_ev_iters: int
  max_ev_method: str
  max_ev_tol: float | None
  max_ev_refine_iters: int
  eps: float
  tic_eps: float
  curvature: str
  exact_max_params: int
  curvature_decay: float
  seed: int
  hvp_chunk: int | None = 1
  updates_in_span: bool = False

  def __post_init__(self) -> None:
    """Checks the settings (the quantities are checked where they are gathered)."""
    if not isinstance(self.updates_in_span, bool):
      raise ValueError(
        f"instruments: updates_in_span must be a bool, got {self.updates_in_span!r}."
      )
    _check_hist_range(self.hist_range, "hist_range", pairs=1)
    _check_hist_range(self.hist2d_range, "hist2d_range", pairs=2)
    if not isinstance(self.every, int) or self.every < 1:
      raise ValueError(f"instruments: every must be a positive int, got {self.every!r}.")
    for name, v in (("chunk", self.chunk), ("hutchinson_probes", self.hutchinson_probes)):
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"instruments: {name} must be a positive int, got {v!r}.")
    if not isinstance(self.max_ev_iters, int) or self.max_ev_iters < 1:
      raise ValueError(
        f"instruments: max_ev_iters must be a positive int, got {self.max_ev_iters!r}."
      )
    if self.max_ev_method not in ("power", "lanczos"):
      raise ValueError(
        f"instruments: max_ev_method must be 'power' or 'lanczos', got {self.max_ev_method!r}."
      )
    if self.curvature not in ("auto", "hutchinson", "exact"):
      raise ValueError(
        f"instruments: curvature must be 'auto', 'hutchinson' or 'exact', got {self.curvature!r}."
      )
    if not isinstance(self.exact_max_params, int) or self.exact_max_params < 0:
      raise ValueError(
        f"instruments: exact_max_params must be an int >= 0, got {self.exact_max_params!r}."
      )
    if self.max_ev_tol is not None and not self.max_ev_tol > 0:
      raise ValueError(f"instruments: max_ev_tol must be > 0 or None, got {self.max_ev_tol!r}.")
    if not isinstance(self.max_ev_refine_iters, int) or self.max_ev_refine_iters < 2:
      raise ValueError(
        f"instruments: max_ev_refine_iters must be an int >= 2, got {self.max_ev_refine_iters!r}."
      )
    if self.hvp_chunk is not None and (
      not isinstance(self.hvp_chunk, int) or isinstance(self.hvp_chunk, bool) or self.hvp_chunk < 1
    ):
      raise ValueError(
        f"instruments: hvp_chunk must be a positive int or None, got {self.hvp_chunk!r}."
      )
    if not 0.0 <= self.curvature_decay < 1.0:
      raise ValueError(
        f"instruments: curvature_decay must be in [0, 1), got {self.curvature_decay!r}."
      )

  @property
  def want(self) -> frozenset[str]:
    return frozenset(self.quantities)

  @property
  def need_second(self) -> bool:
    """The per-example second moment ``M`` (TIC, GSNR, CABS, early stopping, variance)."""
    return bool(self.want & _SECOND_MOMENT)

  def hist_fixed(self) -> tuple[tuple[float, float] | None, ...]:
    """The fixed ranges ``(1-D gradient, 2-D gradient, 2-D parameter)`` (``None``: adaptive)."""
    one = COCKPIT_HIST_RANGES[0] if self.hist_range == "cockpit" else self.hist_range
    two = COCKPIT_HIST_RANGES[1:] if self.hist2d_range == "cockpit" else self.hist2d_range
    one = None if isinstance(one, str) else (float(one[0]), float(one[1]))
    two = (None, None) if isinstance(two, str) else tuple((float(a), float(b)) for a, b in two)
    return (one, *two)

  @property
  def need_hist(self) -> bool:
    return bool(self.want & _HIST)

  @property
  def need_per_example(self) -> bool:
    return self.need_second or bool(self.want & _SQ_NORMS) or self.need_hist

  @property
  def need_hutchinson(self) -> bool:
    return bool(self.want & _HUTCHINSON)

  @property
  def need_hvp(self) -> bool:
    return self.need_hutchinson or "hess_max_ev" in self.want

  @property
  def need_proj_grad(self) -> bool:
    """Per-example projections on the gradient (inner-product and orthogonality tests)."""
    return bool(self.want & _PROJ_GRAD)

  @property
  def need_alpha(self) -> bool:
    return "alpha" in self.want

  def exact(self, params: Any) -> bool:
    """Whether the Hessian diagonal and traces are exact (``P`` HVPs) for ``params``.

    ``curvature="exact"``, or ``"auto"`` with at most ``exact_max_params`` parameters.
    """
    if not self.need_hutchinson or self.curvature == "hutchinson":
      return False
    return self.curvature == "exact" or num_params(params) <= self.exact_max_params

  def use_ema(self, params: Any) -> bool:
    """Whether ``tic_diag`` divides by the moving average of Hutchinson diagonals."""
    return "tic_diag" in self.want and not self.exact(params)

  def fast_hvp(self, params: Any) -> bool:
    """One batched jvp pass serves Hutchinson and a 1-step power iteration.

    Lanczos, more power steps or the exact diagonal apply a linearisation repeatedly
    instead.
    """
    return not self.exact(params) and (
      "hess_max_ev" not in self.want or (self.max_ev_method == "power" and self.max_ev_iters == 1)
    )


#: Cockpit's fixed ranges: ``GradHist1d`` (−2, 2); ``GradHist2d`` gradient (−1, 1), parameter
#: (−2, 2); values outside are clamped into the edge bins.
COCKPIT_HIST_RANGES = ((-2.0, 2.0), (-1.0, 1.0), (-2.0, 2.0))
_HIST_MODES = ("first", "step", "cockpit")


def _check_hist_range(value: Any, name: str, *, pairs: int) -> None:
  """A histogram range setting: a mode name or ``pairs`` ``(lo, hi)`` pairs with ``lo < hi``."""
  if isinstance(value, str):
    if value not in _HIST_MODES:
      raise ValueError(
        f"instruments: {name} must be one of {_HIST_MODES} or ranges, got {value!r}."
      )
    return
  try:
    ranges = [value] if pairs == 1 else list(value)
    ok = len(ranges) == pairs and all(float(lo) < float(hi) for lo, hi in ranges)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    shape = "(lo, hi)" if pairs == 1 else "((grad_lo, grad_hi), (param_lo, param_hi))"
    raise ValueError(
      f"instruments: {name} must be 'first', 'step', 'cockpit' or {shape} with lo < hi, "
      f"got {value!r}."
    )


def num_params(params: Any) -> int:
  """The number of parameters (entries of every leaf)."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


def leaf_names(params: Any) -> list[str]:
  """The layer names of the leaves of ``params``, in leaf order."""
  return [i.name for i in jtree.leaf_infos(params, argname="params")]


def leaf_norms(prefix: str, names: list[str], tree: Any) -> dict[str, jax.Array]:
  """``{prefix}/{leaf}``: the float32 ℓ₂ norm of each leaf of ``tree``."""
  return {
    f"{prefix}/{n}": jnp.sqrt(jnp.sum(jnp.square(x.astype(F32))))
    for n, x in zip(names, jax.tree.leaves(tree), strict=True)
  }


def update_side(key: str) -> bool:
  """Whether ``key`` is measured in ``update`` (needs the update or a projection)."""
  return key in ("alpha", "inner_test", "ortho_test") or key.startswith(_UPDATE_SIDE)


def value_specs(cfg: Config, params: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape and dtype of every value the instruments report (the keys of ``values``)."""
  names = leaf_names(params)
  want = cfg.want
  s = jax.ShapeDtypeStruct((), F32)
  specs: dict[str, jax.ShapeDtypeStruct] = {}
  for q in cfg.quantities:
    if q in _SCALARS:
      specs[q] = s
    if q in _ERROR_BARS:
      specs[f"{q}{_ERROR_BARS[q]}"] = s
  if "hess_trace" in want:
    for n in names:
      specs[f"hessian/trace_stderr/{n}"] = s
  for q, prefixes in _PER_LEAF.items():
    if q in want:
      for prefix in prefixes:
        for n in names:
          specs[f"{prefix}/{n}"] = s
  if "per_example_norms" in want:
    specs["per_example_grads/norm_mean"] = s
    specs["per_example_grads/norm_max"] = s
  if "grad_hist_1d" in want:
    bins = cfg.hist_bins
    specs["per_example_grads/hist_counts"] = jax.ShapeDtypeStruct((bins,), F32)
    specs["per_example_grads/hist_edges"] = jax.ShapeDtypeStruct((bins + 1,), F32)
    specs["per_example_grads/hist_nonfinite"] = s
  if "grad_hist_2d" in want:
    bg, bp = cfg.hist2d_bins
    specs["per_example_grads/hist2d_counts_grad_param"] = jax.ShapeDtypeStruct((bg, bp), F32)
    specs["per_example_grads/hist2d_grad_edges"] = jax.ShapeDtypeStruct((bg + 1,), F32)
    specs["per_example_grads/hist2d_param_edges"] = jax.ShapeDtypeStruct((bp + 1,), F32)
  return specs
