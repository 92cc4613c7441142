"""What the instruments can measure, the presets, and the settings of one instance."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxscope import tree as jtree

__all__ = [
  "INSTRUMENT_PRESETS",
  "QUANTITIES",
  "Config",
  "leaf_names",
  "leaf_norms",
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
  "hess_trace": "Hessian trace, Hutchinson estimate, total and per leaf [HessTrace]",
  "tic_diag": "Takeuchi information criterion with a diagonal Hessian estimate [TICDiag]",
  "tic_trace": "Takeuchi information criterion from traces [TICTrace]",
  "hess_max_ev": "largest-magnitude Hessian eigenvalue, warm-started power iteration [HessMaxEV]",
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
_PER_LEAF = {
  "grad_norm": ("grads/norm",),
  "distance": ("params/distance",),
  "update_size": ("updates/norm",),
  "hess_trace": ("hessian/trace",),
  "grad_variance": ("per_example_grads/variance", "per_example_grads/second_moment"),
}
_UPDATE_SIDE = ("params/distance/", "updates/norm/")


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
  hutchinson_probes: int
  max_ev_iters: int
  max_ev_method: str
  eps: float
  tic_eps: float
  tic_curvature: str
  curvature_decay: float
  seed: int

  def __post_init__(self) -> None:
    """Checks the settings (the quantities are checked where they are gathered)."""
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
    if self.tic_curvature not in ("hutchinson", "exact"):
      raise ValueError(
        f"instruments: tic_curvature must be 'hutchinson' or 'exact', got {self.tic_curvature!r}."
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

  @property
  def use_ema(self) -> bool:
    """Whether ``tic_diag`` divides by the moving average of Hutchinson diagonals."""
    return "tic_diag" in self.want and self.tic_curvature == "hutchinson"

  @property
  def fast_hvp(self) -> bool:
    """One batched jvp pass serves Hutchinson and a 1-step power iteration.

    Lanczos, more power steps or the exact diagonal apply a linearisation repeatedly
    instead.
    """
    return not ("tic_diag" in self.want and self.tic_curvature == "exact") and (
      "hess_max_ev" not in self.want or (self.max_ev_method == "power" and self.max_ev_iters == 1)
    )


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
  if "grad_hist_2d" in want:
    bx, by = cfg.hist2d_bins
    specs["per_example_grads/hist2d_counts"] = jax.ShapeDtypeStruct((bx, by), F32)
    specs["per_example_grads/hist2d_param_edges"] = jax.ShapeDtypeStruct((bx + 1,), F32)
    specs["per_example_grads/hist2d_grad_edges"] = jax.ShapeDtypeStruct((by + 1,), F32)
  return specs
