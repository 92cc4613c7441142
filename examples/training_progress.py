"""Training progress from checkpoints: the nnvis thesis's analyses on LeNet-5 / digits (issue #6).

The nnvis thesis and tool (``suzrz/nnvis``) look at a finished training run through its
checkpoints: the loss along the *linear* path from the initial to the final weights
(Goodfellow, Vinyals & Saxe 2015) and along a *quadratic* (Lagrange) path through a middle
checkpoint, both compared with the real validation curve; the same paths at *layer* level
(one layer moves, the rest stays trained) and at *parameter* level (one scalar moves); a
random-direction loss surface around the trained model (Li et al. 2018); and the trajectory
projected on its two principal directions. This script repeats all of it on the embedded
digits with jaxscope (every evaluation runs on the compiled kernel of
:mod:`jaxscope.analysis`):

1. trains LeNet-5 (the thesis's network) on digits with :func:`jaxscope.train.train`:
   SGD with momentum 0.9, lr 0.05, batch 64, a fixed seed, 14 epochs (as nnvis's own
   figures), a checkpoint per epoch (15 checkpoints, epoch 0 = the initialisation);
2. **paths**: linear ``θ(α) = (1−α)θ_0 + αθ_f`` and quadratic through the middle epoch
   checkpoint ``θ_m`` placed at ``α = ½`` (nnvis) or at its own projected ``α_m``, for
   ``α ∈ [−0.5, 1.5]``; the real curve is every checkpoint's true test loss placed at its
   projected ``α_t = ⟨θ_t − θ_0, θ_f − θ_0⟩ / ‖θ_f − θ_0‖²`` (and, as nnvis's figure did, at
   its epoch fraction ``e/E``); the mean absolute error of each path against it says which
   path is closer and by how much;
3. **layers**: the linear and quadratic paths of every layer overlaid, line opacity coded by
   the layer's distance ``‖θ_f − θ_0‖`` (min–max normalised, floor 0.1, as nnvis), and the
   re-initialisation / re-randomisation test of Zhang, Bengio & Singer
   (:func:`jaxscope.analysis.layer_robustness`) classifying each layer as *critical* or
   *ambient* (the thesis's "robust" is this *critical*);
4. **parameters**: the ``k`` scalars with the largest ``|θ_f − θ_0|``, each moved alone
   along the paths, opacity by distance;
5. **surface**: ``L(θ_f + aδ + bη)`` on a grid with two seeded, filter-normalised random
   directions (biases zeroed);
6. **PCA trajectory**: the top two principal directions of the 15 checkpoints, their
   explained variance, every checkpoint projected (origin ``θ_f``) with its off-plane
   residual, its true loss next to the loss of the plane at its projection, and the loss
   surface of that plane.

Run it with::

    python examples/training_progress.py            # the default run (about 1 min, 2 cores)
    python examples/training_progress.py --quick    # a smoke test

It writes ``OUT/results/training_progress.json`` and ``OUT/figures/progress_*.png`` (``--out``,
default ``docs/``), keeps the run (checkpoints) in ``--run-dir`` (default
``runs/training_progress``; a matching earlier run there is reused) with the two surfaces as
``.npz`` + ``.json`` in ``RUN_DIR/analysis/``, and prints a summary.
"""

from __future__ import annotations

import os
import sys

# The smoke test (--quick) spends most of its time compiling. XLA:CPU without LLVM
# optimisation and with its classic instead of its MLIR fusion emitters compiles two to
# three times as fast, which outweighs its slower steps. This must happen before JAX is
# imported (so it only applies when the script is run as a program).
if "--quick" in sys.argv[1:] and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  ).strip()

import argparse
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import jaxscope
from jaxscope import analysis, data, models, record
from jaxscope import tree as jtree
from jaxscope.checkpoint import RunCheckpoints
from jaxscope.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS: dict[str, Any] = {
  "epochs": 14,
  "alphas": 81,
  "top_k": 12,
  "per_layer": 2,
  "grid": 41,
  "pca_grid": 41,
  "rerandomize_seeds": 3,
}
QUICK: dict[str, Any] = {
  "epochs": 2,
  "alphas": 9,
  "top_k": 4,
  "per_layer": 1,
  "grid": 5,
  "pca_grid": 5,
  "rerandomize_seeds": 1,
}
TRAIN = {
  "model": "lenet5",
  "dataset": "digits",
  "optimizer": "momentum",
  "lr": 0.05,
  "batch_size": 64,
}
COLORS = {"linear": "tab:orange", "quadratic": "tab:blue", "quadratic_proj": "tab:green"}
#: A second, looser reading of the same re-initialisation errors (reported next to the
#: library's defaults, ambient_tol 0.01 and critical_tol 0.10).
LOOSER = {"ambient_tol": 0.05, "critical_tol": 0.5}
CLASS_COLORS = {"critical": "tab:red", "intermediate": "tab:olive", "ambient": "tab:cyan"}


# ----------------------------------------------------------------------------- helpers


def _r(x: Any, digits: int = 6) -> Any:
  """Floats rounded to ``digits`` significant digits (arrays to lists), for the JSON."""
  a = np.asarray(x, np.float64)
  if a.ndim == 0:
    v = float(a)
    return float(f"{v:.{digits}g}") if np.isfinite(v) else None
  return [_r(v, digits) for v in a]


def _flat(tree: Any) -> np.ndarray:
  """A parameter tree as one float64 vector."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _opacity(distance: Sequence[float]) -> np.ndarray:
  """nnvis's line opacity: min–max normalised distance, floored at 0.1."""
  d = np.asarray(distance, np.float64)
  span = d.max() - d.min()
  norm = (d - d.min()) / span if span > 0 else np.ones_like(d)
  return np.maximum(norm, 0.1)


def _axis_label(text: str, ax: Any) -> None:
  ax.set_title(text, fontsize=10, loc="left")


def train_run(run_dir: Path, epochs: int, seed: int) -> dict[str, Any]:
  """Trains LeNet-5 on digits with a checkpoint per epoch, or reuses a matching run."""
  want = {**TRAIN, "epochs": epochs, "seed": seed}
  cfg = run_dir / "config.json"
  reused = False
  if cfg.exists():
    old = record.read_json(cfg)
    diff = sorted(k for k, v in want.items() if old.get(k) != v)
    if diff or old.get("checkpoint_every") is not None:
      raise SystemExit(
        f"{run_dir} holds a different run (differs in {diff or ['checkpoint_every']}); "
        "pass another --run-dir or delete it."
      )
    reused = True
  t0 = time.perf_counter()
  res = train(**want, metrics="none", out=str(run_dir), quiet=True, resume=True)
  return {
    "steps": int(res.steps),
    "final_eval": res.final_eval,
    "wall_s": time.perf_counter() - t0,
    "reused": reused,
  }


# ----------------------------------------------------------------------------- analyses


def nearest_on_path(
  nodes: Sequence[Any], weights: np.ndarray, checkpoints: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
  """For each checkpoint, the path parameter of the nearest path point and its distance.

  The path is ``θ(α) = Σ_j w_j(α) B_j`` with ``weights [A, r]`` on a fine α grid; squared
  distances come from the Gram matrix of ``[B_0 … B_{r−1}, θ_t]`` (float64), so no path
  point is ever built. Returns ``(alpha_index [T], distance [T])``.
  """
  B = np.stack([_flat(t) for t in nodes])  # [r, P]
  gram = B @ B.T
  idx, dist = [], []
  for theta in checkpoints:
    v = _flat(theta)
    d2 = np.einsum("ar,rs,as->a", weights, gram, weights) - 2 * weights @ (B @ v) + v @ v
    i = int(np.argmin(d2))
    idx.append(i)
    dist.append(float(np.sqrt(max(d2[i], 0.0))))
  return np.asarray(idx), np.asarray(dist)


def analyse_paths(
  apply_fn: Any,
  es: Any,
  params: list[Any],
  steps: list[int],
  true_loss: np.ndarray,
  alphas: np.ndarray,
) -> dict[str, Any]:
  """Linear vs quadratic vs real curve at model level."""
  theta_0, theta_f = params[0], params[-1]
  m = (len(params) - 1) // 2  # nnvis: the median epoch checkpoint
  theta_m = params[m]
  alpha_t = analysis.project_on_path(theta_0, theta_f, params)
  frac_t = np.asarray(steps, np.float64) / steps[-1]
  alpha_m = float(alpha_t[m])
  paths = {
    "linear": analysis.model_path(apply_fn, es, theta_0, theta_f, alphas=alphas),
    "quadratic": analysis.model_path(
      apply_fn, es, theta_0, theta_f, theta_mid=theta_m, mid=0.5, alphas=alphas
    ),
  }
  if 0.0 < alpha_m < 1.0:
    paths["quadratic_proj"] = analysis.model_path(
      apply_fn, es, theta_0, theta_f, theta_mid=theta_m, mid=alpha_m, alphas=alphas
    )
  inner = slice(1, len(params) - 1)  # the endpoints are exact for every path
  mae = {
    "at_projected_alpha": {k: analysis.path_error(p, alpha_t, true_loss) for k, p in paths.items()},
    "at_projected_alpha_interior": {
      k: analysis.path_error(p, alpha_t[inner], true_loss[inner]) for k, p in paths.items()
    },
    "at_epoch_fraction": {k: analysis.path_error(p, frac_t, true_loss) for k, p in paths.items()},
  }
  # Parametrisation-free: each checkpoint against the path point nearest to it in parameter
  # space (the loss there interpolated from the path's α grid).
  fine = np.linspace(alphas[0], alphas[-1], 16 * (len(alphas) - 1) + 1)
  nodes = {
    "linear": ([theta_0, theta_f], analysis.linear_weights(fine)),
    "quadratic": ([theta_0, theta_m, theta_f], analysis.lagrange_weights(fine, 0.5)),
    "quadratic_proj": ([theta_0, theta_m, theta_f], analysis.lagrange_weights(fine, alpha_m)),
  }
  scale = float(np.linalg.norm(_flat(theta_f) - _flat(theta_0)))
  nearest: dict[str, Any] = {}
  for key, path in paths.items():
    i, d = nearest_on_path(*nodes[key], params)
    a_near = fine[i]
    pred = np.interp(a_near, path.alpha, path.loss)
    nearest[key] = {
      "alpha": a_near,
      "relative_distance": d / scale,
      "mae": float(np.mean(np.abs(pred - true_loss))),
    }
  mae["at_nearest_point"] = {k: v["mae"] for k, v in nearest.items()}
  lin, quad = mae["at_projected_alpha"]["linear"], mae["at_projected_alpha"]["quadratic"]
  return {
    "mid_index": m,
    "mid_step": steps[m],
    "mid_time_fraction": float(frac_t[m]),
    "mid_projected_alpha": alpha_m,
    "alpha_t": alpha_t,
    "epoch_fraction": frac_t,
    "paths": paths,
    "mae": mae,
    "nearest": nearest,
    "closer": "quadratic" if quad < lin else "linear",
    "mae_ratio_linear_over_quadratic": lin / quad if quad > 0 else float("inf"),
  }


def layer_stats(params: list[Any]) -> dict[str, dict[str, float]]:
  """Per layer (module): distance, relative distance and path length over checkpoints."""
  lay = jtree.layout(params[-1], depth=-1)
  leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(p)] for p in params]
  out = {}
  for g in lay.groups:
    idx = [i.index for i in g.leaves]

    def norm(t: int, s: int | None = None, idx: list[int] = idx) -> float:
      if s is None:
        return float(np.sqrt(sum(np.sum(leaves[t][i] ** 2) for i in idx)))
      return float(np.sqrt(sum(np.sum((leaves[t][i] - leaves[s][i]) ** 2) for i in idx)))

    d = norm(len(params) - 1, 0)
    out[g.key] = {
      "distance": d,
      "relative_distance": d / norm(0) if norm(0) > 0 else float("inf"),
      "path_length": sum(norm(t + 1, t) for t in range(len(params) - 1)),
    }
  return out


def plane_losses(apply_fn: Any, es: Any, origin: Any, dirs: Sequence[Any], coords: np.ndarray):
  """Loss of the plane ``origin + Σ c_k d_k`` at each row of ``coords``."""
  ev = analysis.make_point_evaluator(apply_fn, [origin, *dirs], es)
  c = np.concatenate([np.ones((len(coords), 1)), coords], axis=1)
  return ev.evaluate(c)["loss"]


# ----------------------------------------------------------------------------- figures


def paths_figure(res: dict[str, Any], true_loss: np.ndarray, true_acc: np.ndarray) -> Figure:
  fig = Figure(figsize=(12, 4.6), layout="constrained")
  ax_l, ax_a = fig.subplots(1, 2)
  labels = {
    "linear": "linear θ(α)",
    "quadratic": f"quadratic, θ_m at α = 0.5 (nnvis; epoch {res['mid_index']})",
    "quadratic_proj": f"quadratic, θ_m at its projected α = {res['mid_projected_alpha']:.2f}",
  }
  for key, p in res["paths"].items():
    mae = res["mae"]["at_projected_alpha"][key]
    ax_l.plot(p.alpha, p.loss, color=COLORS[key], label=f"{labels[key]} (MAE {mae:.3f})")
    ax_a.plot(p.alpha, p.accuracy, color=COLORS[key], label=labels[key])
  ax_l.plot(
    res["alpha_t"], true_loss, "ko-", ms=4, lw=1, label="checkpoints at projected α_t (real)"
  )
  ax_l.plot(
    res["epoch_fraction"],
    true_loss,
    "s--",
    color="0.55",
    ms=3,
    lw=1,
    label="checkpoints at e/E (nnvis's twin axis)",
  )
  ax_a.plot(res["alpha_t"], true_acc, "ko-", ms=4, lw=1, label="checkpoints at projected α_t")
  for t, (a, lv) in enumerate(zip(res["alpha_t"], true_loss, strict=True)):
    if t in (0, 1, 2, res["mid_index"], len(true_loss) - 1):
      ax_l.annotate(str(t), (a, lv), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax_l.set_yscale("log")
  ax_l.set_xlabel("α  (0 = initialisation, 1 = final)")
  ax_l.set_ylabel("test loss (log)")
  ax_a.set_xlabel("α")
  ax_a.set_ylabel("test accuracy")
  _axis_label("(a) loss along the paths and at the real checkpoints (numbers: epoch)", ax_l)
  _axis_label("(b) accuracy", ax_a)
  ax_l.legend(fontsize=7, loc="upper center")
  for ax in (ax_l, ax_a):
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(1, color="0.8", lw=0.8, zorder=0)
  return fig


def layers_figure(
  lin: dict[str, Any],
  quad: dict[str, Any],
  model_lin: Any,
  model_quad: Any,
  labels: dict[str, str],
) -> Figure:
  fig = Figure(figsize=(12, 4.6), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  names = list(lin)
  alpha = _opacity([lin[n].distance for n in names])
  cmap = colormaps["tab10"]
  for ax, res, model, title in (
    (axes[0], lin, model_lin, "(a) linear, one layer moves (rest at θ_f)"),
    (axes[1], quad, model_quad, "(b) quadratic through θ_m (α = 0.5)"),
  ):
    for i, n in enumerate(names):
      ax.plot(
        res[n].alpha,
        res[n].loss,
        color=cmap(i),
        alpha=float(alpha[i]),
        lw=1.6,
        label=f"{n} [{labels[n]}] ‖Δ‖={res[n].distance:.2f}",
      )
    ax.plot(model.alpha, model.loss, color="k", lw=1.2, ls="--", label="whole model")
    ax.set_yscale("log")
    ax.set_xlabel("α")
    _axis_label(title, ax)
  axes[0].set_ylabel("test loss (log); opacity = layer distance")
  axes[0].legend(fontsize=7)
  return fig


def robustness_figure(rob: Any, epochs: Sequence[float]) -> Figure:
  fig = Figure(figsize=(12, 4.6), layout="constrained")
  ax_h, ax_b = fig.subplots(1, 2, width_ratios=[1.4, 1])
  im = ax_h.imshow(rob.error, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, origin="lower")
  ax_h.set_xticks(range(len(rob.layers)), rob.layers)
  ax_h.set_yticks(range(len(epochs)), [f"{e:g}" for e in epochs], fontsize=7)
  ax_h.set_ylabel("τ: the layer is reset to its weights at epoch τ")
  for j in range(len(rob.layers)):
    ax_h.text(j, 0, f"{rob.error[0, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
  fig.colorbar(im, ax=ax_h, label="test error")
  _axis_label("(a) re-initialisation: test error, layer reset to checkpoint τ", ax_h)
  x = np.arange(len(rob.layers))
  ax_b.bar(x - 0.2, rob.error[0], 0.4, label="re-initialised (τ = 0)", color="tab:blue")
  if rob.rerandomized_error.size:
    ax_b.bar(
      x + 0.2,
      rob.rerandomized_error.mean(axis=0),
      0.4,
      label=f"re-randomised (mean of {len(rob.rerandomized_error)} draws)",
      color="tab:purple",
    )
  ax_b.axhline(rob.base_error, color="k", lw=1, label="trained model")
  ax_b.axhline(rob.thresholds["chance_error"], color="tab:red", ls=":", label="chance")
  short = {"critical": "critical", "intermediate": "interm.", "ambient": "ambient"}
  ax_b.set_xticks(x, [f"{n}\n{short[rob.labels[n]]}" for n in rob.layers])
  for tick, n in zip(ax_b.get_xticklabels(), rob.layers, strict=True):
    tick.set_color(CLASS_COLORS[rob.labels[n]])
  ax_b.set_ylabel("test error")
  ax_b.set_ylim(0, 1.25)
  ax_b.legend(fontsize=7, ncol=2, loc="upper left")
  _axis_label("(b) classes: critical / ambient (thresholds in the text)", ax_b)
  return fig


def parameters_figure(lin: list[Any], quad: list[Any], model_lin: Any) -> Figure:
  by_layer: dict[str, list[int]] = {}
  for i, p in enumerate(lin):
    by_layer.setdefault(p.name.split("/")[0], []).append(i)
  n = len(by_layer)
  fig = Figure(figsize=(3.3 * n, 4.2), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, n))  # own y scales: fc scalars move the loss little
  alpha = _opacity([p.distance for p in lin])
  for ax, (layer, idx) in zip(axes, by_layer.items(), strict=True):
    for i in idx:
      ax.plot(lin[i].alpha, lin[i].loss, color="tab:orange", alpha=float(alpha[i]), lw=1.4)
      ax.plot(quad[i].alpha, quad[i].loss, color="tab:blue", alpha=float(alpha[i]), lw=1.0)
    ax.axhline(model_lin.loss[np.argmin(np.abs(model_lin.alpha - 1.0))], color="k", lw=0.8)
    ax.set_xlabel("α (only this scalar moves)")
    _axis_label(f"{layer}: {len(idx)} scalar(s)", ax)
  axes[0].set_ylabel("test loss (own scale per panel)")
  fig.suptitle(
    "top-|Δθ| scalars: orange linear, blue quadratic (θ_m at α = 0.5); "
    "opacity = |Δθ| (min–max, floor 0.1); black: L(θ_f)",
    fontsize=10,
  )
  return fig


def surface_figure(land: Any, title: str) -> Figure:
  fig = Figure(figsize=(12, 5), layout="constrained")
  ax_c = fig.add_subplot(1, 2, 1)
  ax_s = fig.add_subplot(1, 2, 2, projection="3d")
  z = np.asarray(land.loss, np.float64)
  lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
  levels = np.geomspace(lo, hi, 25)
  xx, yy = np.meshgrid(land.x, land.y)
  cs = ax_c.contourf(xx, yy, z, levels=levels, norm=LogNorm(lo, hi), cmap="viridis")
  ax_c.contour(xx, yy, z, levels=levels, colors="k", linewidths=0.3)
  fig.colorbar(cs, ax=ax_c, label="test loss (log levels)", format="%.2g")
  ax_c.plot([0], [0], "r*", ms=10, label="θ_f (centre)")
  ax_c.set_xlabel("a (along δ)")
  ax_c.set_ylabel("b (along η)")
  ax_c.legend(fontsize=7, loc="lower right")
  _axis_label(f"(a) {title}", ax_c)
  ax_s.plot_surface(xx, yy, np.log10(z), cmap="viridis", linewidth=0, antialiased=True)
  ax_s.set_xlabel("a")
  ax_s.set_ylabel("b")
  ax_s.set_zlabel("log10 loss")
  ax_s.set_title("(b) surface", fontsize=10, loc="left")
  return fig


def pca_figure(
  land: Any,
  coords: np.ndarray,
  evr: np.ndarray,
  true_loss: np.ndarray,
  plane: np.ndarray,
  resid: np.ndarray,
  epochs: Sequence[float],
) -> Figure:
  fig = Figure(figsize=(12, 4.8), layout="constrained")
  ax_c, ax_l = fig.subplots(1, 2)
  z = np.asarray(land.loss, np.float64)
  lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
  levels = np.geomspace(lo, hi, 25)
  xx, yy = np.meshgrid(land.x, land.y)
  cs = ax_c.contourf(xx, yy, z, levels=levels, norm=LogNorm(lo, hi), cmap="viridis")
  ax_c.contour(xx, yy, z, levels=levels, colors="k", linewidths=0.3)
  fig.colorbar(cs, ax=ax_c, label="loss on the plane (log levels)", format="%.2g")
  ax_c.plot(coords[:, 0], coords[:, 1], "w.-", lw=1, ms=6)
  for t in range(len(coords)):
    if t in (0, 1, 2, len(coords) - 1) or t % 4 == 0:
      ax_c.annotate(
        f"{epochs[t]:g}",
        coords[t],
        color="w",
        fontsize=7,
        xytext=(3, 3),
        textcoords="offset points",
      )
  ax_c.plot([0], [0], "r*", ms=10)
  ax_c.set_xlabel(f"1st PC: {100 * evr[0]:.1f} %")
  ax_c.set_ylabel(f"2nd PC: {100 * evr[1]:.1f} %")
  _axis_label("(a) PCA plane around θ_f, trajectory projected (labels: epoch)", ax_c)
  ax_l.plot(epochs, true_loss, "ko-", ms=4, label="true loss L(θ_t)")
  ax_l.plot(epochs, plane, "s--", color="tab:green", ms=4, label="plane loss at the projection")
  ax_l.set_yscale("log")
  ax_l.set_xlabel("epoch")
  ax_l.set_ylabel("test loss (log)")
  ax_r = ax_l.twinx()
  shown = np.where(np.arange(len(resid)) == len(resid) - 1, np.nan, resid)  # θ_f: the origin
  ax_r.plot(epochs, shown, "^:", color="tab:red", ms=4, label="off-plane residual ‖r−Pr‖/‖r‖")
  ax_r.set_ylabel("residual fraction", color="tab:red")
  ax_r.set_ylim(0, 1.05)
  h1, l1 = ax_l.get_legend_handles_labels()
  h2, l2 = ax_r.get_legend_handles_labels()
  ax_l.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
  _axis_label("(b) the plane is not the trajectory: true vs plane loss, residual", ax_l)
  return fig


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", default="docs", help="writes OUT/results and OUT/figures")
  p.add_argument(
    "--run-dir",
    default=str(ROOT / "runs" / "training_progress"),
    help="the training run (checkpoints); a matching earlier run there is reused",
  )
  p.add_argument("--epochs", type=int, help=f"training epochs (default {DEFAULTS['epochs']})")
  p.add_argument("--seed", type=int, default=0, help="training seed")
  p.add_argument("--direction-seed", type=int, default=123, help="random-direction seed")
  p.add_argument(
    "--alphas", type=int, help=f"points on α ∈ [−0.5, 1.5], 8k + 1 ({DEFAULTS['alphas']})"
  )
  p.add_argument("--top-k", type=int, help=f"scalars at parameter level ({DEFAULTS['top_k']})")
  p.add_argument(
    "--per-layer",
    type=int,
    help=f"top scalars of each layer absent from the top k ({DEFAULTS['per_layer']})",
  )
  p.add_argument("--grid", type=int, help=f"random surface points per axis ({DEFAULTS['grid']})")
  p.add_argument("--pca-grid", type=int, help=f"PCA plane points per axis ({DEFAULTS['pca_grid']})")
  p.add_argument(
    "--rerandomize-seeds",
    type=int,
    help=f"re-randomisation draws ({DEFAULTS['rerandomize_seeds']})",
  )
  p.add_argument("--quick", action="store_true", help="a tiny smoke-test configuration")
  args = p.parse_args(argv)
  base = QUICK if args.quick else DEFAULTS
  for key, value in base.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if (args.alphas - 1) % 8:
    p.error("--alphas must be 8k + 1 (9, 17, …, 81), so that α = 0, 0.5 and 1 are on the grid.")
  if args.epochs < 2:
    p.error("--epochs must be ≥ 2 (the PCA of the trajectory needs three checkpoints).")
  if args.alphas < 3 or args.grid < 3 or args.pca_grid < 3 or min(args.top_k, args.per_layer) < 1:
    p.error("--alphas, --grid and --pca-grid must be ≥ 3, --top-k and --per-layer ≥ 1.")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  t_start = time.perf_counter()
  out = Path(args.out)
  run_dir = Path(args.run_dir)
  timings: dict[str, float] = {}

  def lap(name: str, t0: float) -> float:
    timings[name] = round(time.perf_counter() - t0, 2)
    print(f"  {name}: {timings[name]:.1f} s", flush=True)
    return time.perf_counter()

  t = time.perf_counter()
  print(f"training LeNet-5 on digits, {args.epochs} epochs, into {run_dir}", flush=True)
  trained = train_run(run_dir, args.epochs, args.seed)
  t = lap("train", t)

  ds = data.load("digits")
  model = models.build("lenet5", tuple(ds.train_x.shape[1:]), ds.num_classes)

  def apply_fn(p: Any, s: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": p, **s}, x, train=False)[0]

  with RunCheckpoints(run_dir) as rc:
    cps = list(rc.iter())
  steps = [c.step for c in cps]
  epochs = [float(c.meta["epoch"]) for c in cps]
  logged = np.asarray([c.meta.get("eval_loss", np.nan) for c in cps], np.float64)
  params = [c.params for c in cps]
  es = analysis.make_eval_set(ds.test_x, ds.test_y)

  # Every checkpoint's true test loss, on the kernel (one-hot coefficients).
  ev = analysis.make_point_evaluator(apply_fn, params, es)
  true = ev.evaluate(np.eye(len(params)))
  true_loss, true_acc = true["loss"].astype(np.float64), true["accuracy"].astype(np.float64)
  t = lap("checkpoints", t)

  # 1. Model-level paths vs the real curve.
  alphas = np.linspace(-0.5, 1.5, args.alphas)
  pres = analyse_paths(apply_fn, es, params, steps, true_loss, alphas)
  t = lap("paths", t)

  # 2. Layer level: paths per layer, distances, robustness classes.
  theta_0, theta_f, theta_m = params[0], params[-1], params[pres["mid_index"]]
  lin_layers = analysis.layer_paths(apply_fn, es, theta_0, theta_f, alphas=alphas)
  quad_layers = analysis.layer_paths(
    apply_fn, es, theta_0, theta_f, theta_mid=theta_m, mid=0.5, alphas=alphas
  )
  x0 = jnp.asarray(ds.train_x[:1])
  rob = analysis.layer_robustness(
    apply_fn,
    es,
    params,
    steps,
    num_classes=ds.num_classes,
    init_fn=lambda k: model.init(k, x0)["params"],
    seeds=args.rerandomize_seeds,
  )
  lstats = layer_stats(params)
  traj = analysis.trajectory_stats(params)
  t = lap("layers", t)

  # 3. Parameter level: the top-|Δθ| scalars, alone along the paths.
  sel = analysis.select_parameters(theta_0, theta_f, how="top", k=args.top_k)
  n_top = len(sel)
  for layer in lin_layers:  # every layer gets a panel: its own top scalars if none made it
    if not any(name.split("/")[0] == layer for name, _ in sel):
      sel += analysis.select_parameters(
        theta_0, theta_f, how="top", k=args.per_layer, include=f"^{layer}/"
      )
  lin_par = analysis.parameter_paths(apply_fn, es, theta_0, theta_f, sel, alphas=alphas)
  quad_par = analysis.parameter_paths(
    apply_fn, es, theta_0, theta_f, sel, theta_mid=theta_m, mid=0.5, alphas=alphas
  )
  t = lap("parameters", t)

  # 4. Random-direction surface around θ_f.
  dx, dy = analysis.random_directions(theta_f, args.direction_seed, 2)
  cos = float(analysis.cosine(dx, dy))
  axis = np.linspace(-1.0, 1.0, args.grid)
  surf = analysis.landscape_2d(
    apply_fn,
    es,
    theta_f,
    dx,
    dy,
    axis,
    axis,
    settings={
      "directions": "random",
      "norm": "filter",
      "ignore_1d": "zero",
      "seed": args.direction_seed,
      "center_step": steps[-1],
      "cosine": cos,
    },
  )
  analysis.save_landscape(run_dir / "analysis" / "surface_random", surf)
  t = lap("surface", t)

  # 5. PCA of the trajectory: plane, projection, true vs plane loss.
  pca = analysis.pca_directions(params, 2)
  coords, resid = analysis.project(params, theta_f, pca.directions)
  plane = plane_losses(apply_fn, es, theta_f, pca.directions, coords).astype(np.float64)
  spans = []
  for k in range(2):
    lo, hi = min(coords[:, k].min(), 0.0), max(coords[:, k].max(), 0.0)
    pad = 0.15 * (hi - lo)
    spans.append(np.linspace(lo - pad, hi + pad, args.pca_grid))
  pland = analysis.landscape_2d(
    apply_fn,
    es,
    theta_f,
    *pca.directions,
    spans[0],
    spans[1],
    settings={
      "directions": "pca",
      "center": pca.center,
      "ignore_1d": "zero",
      "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
      "center_step": steps[-1],
    },
  )
  analysis.save_landscape(
    run_dir / "analysis" / "surface_pca", pland, coords=coords, residual=resid, steps=steps
  )
  t = lap("pca", t)

  # ------------------------------------------------------------------------- figures
  figdir, resdir = out / "figures", out / "results"
  figdir.mkdir(parents=True, exist_ok=True)
  resdir.mkdir(parents=True, exist_ok=True)
  figures = {
    "progress_paths.png": paths_figure(pres, true_loss, true_acc),
    "progress_layers.png": layers_figure(
      lin_layers, quad_layers, pres["paths"]["linear"], pres["paths"]["quadratic"], rob.labels
    ),
    "progress_robustness.png": robustness_figure(rob, epochs),
    "progress_parameters.png": parameters_figure(lin_par, quad_par, pres["paths"]["linear"]),
    "progress_surface.png": surface_figure(
      surf, f"random filter-normalised directions (seed {args.direction_seed})"
    ),
    "progress_pca.png": pca_figure(
      pland, coords, pca.explained_variance_ratio, true_loss, plane, resid, epochs
    ),
  }
  for name, fig in figures.items():
    fig.savefig(figdir / name, dpi=80 if args.quick else 110)
  t = lap("figures", t)

  # ------------------------------------------------------------------------- results
  def path_json(p: Any) -> dict[str, Any]:
    return {"loss": _r(p.loss), "accuracy": _r(p.accuracy), "distance": _r(p.distance)}

  def span(p: Any, lo: float, hi: float) -> float:
    inside = (p.alpha >= lo - 1e-9) & (p.alpha <= hi + 1e-9)
    return float(p.loss[inside].max() - p.loss[inside].min())

  z = np.asarray(surf.loss, np.float64)
  c = args.grid // 2
  rim = np.concatenate([z[0], z[-1], z[1:-1, 0], z[1:-1, -1]])
  imin = np.unravel_index(np.nanargmin(z), z.shape)
  final_loss = float(true_loss[-1])
  levels = ("critical", "intermediate", "ambient")
  report: dict[str, Any] = {
    "command": "python examples/training_progress.py" + (" --quick" if args.quick else ""),
    "config": {
      **TRAIN,
      "epochs": args.epochs,
      "seed": args.seed,
      "checkpoints": "one per epoch (epoch 0 = initialisation)",
      "eval_set": f"digits test split ({es.n} examples, sha256 {es.digest})",
      "alphas": [float(alphas[0]), float(alphas[-1]), len(alphas)],
      "top_k": args.top_k,
      "per_layer": args.per_layer,
      "grid": args.grid,
      "pca_grid": args.pca_grid,
      "direction_seed": args.direction_seed,
      "rerandomize_seeds": args.rerandomize_seeds,
      "quick": args.quick,
    },
    "environment": {
      "jaxscope": jaxscope.__version__,
      "jax": jax.__version__,
      "device": str(jax.devices()[0]),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "training": {
      **{k: v for k, v in trained.items() if k != "final_eval"},
      "final_test_loss": final_loss,
      "final_test_accuracy": float(true_acc[-1]),
    },
    "checkpoints": {
      "steps": steps,
      "epochs": epochs,
      "true_loss": _r(true_loss),
      "true_accuracy": _r(true_acc),
      "logged_eval_loss": _r(logged),
      "max_abs_diff_logged_vs_kernel": float(np.nanmax(np.abs(logged - true_loss))),
    },
    "paths": {
      "alpha": _r(alphas),
      "mid_index": pres["mid_index"],
      "mid_step": pres["mid_step"],
      "mid_time_fraction": pres["mid_time_fraction"],
      "mid_projected_alpha": pres["mid_projected_alpha"],
      "checkpoint_alpha": _r(pres["alpha_t"]),
      "checkpoint_epoch_fraction": _r(pres["epoch_fraction"]),
      **{k: path_json(p) for k, p in pres["paths"].items()},
      "mae": {k: {kk: _r(vv) for kk, vv in v.items()} for k, v in pres["mae"].items()},
      "nearest_point": {
        k: {kk: _r(vv) for kk, vv in v.items() if kk != "mae"} for k, v in pres["nearest"].items()
      },
      "closer": pres["closer"],
      "mae_ratio_linear_over_quadratic": _r(pres["mae_ratio_linear_over_quadratic"]),
      "linear_max_loss_on_0_1": _r(
        pres["paths"]["linear"].loss[(alphas >= 0) & (alphas <= 1)].max()
      ),
    },
    "layers": {
      "names": list(lin_layers),
      "stats": {k: {kk: _r(vv) for kk, vv in v.items()} for k, v in lstats.items()},
      "linear_loss_at_alpha0": {
        k: _r(p.loss[np.argmin(np.abs(alphas))]) for k, p in lin_layers.items()
      },
      "linear": {k: path_json(p) for k, p in lin_layers.items()},
      "quadratic": {k: path_json(p) for k, p in quad_layers.items()},
      "robustness": {
        "steps": list(rob.steps),
        "reinit_error": [_r(row) for row in rob.error],
        "reinit_loss": [_r(row) for row in rob.loss],
        "rerandomized_error": [_r(row) for row in rob.rerandomized_error],
        "base_error": _r(rob.base_error),
        "labels": rob.labels,
        "thresholds": rob.thresholds,
        "counts": {lv: sum(v == lv for v in rob.labels.values()) for lv in levels},
        "labels_looser": analysis.classify_layers(
          rob.error[0],
          rob.base_error,
          rob.layers,
          chance_error=rob.thresholds["chance_error"],
          **LOOSER,
        ),
        "thresholds_looser": LOOSER,
        "reinit_error_epoch1": dict(zip(rob.layers, _r(rob.error[1]), strict=True)),
      },
      "trajectory": {
        "distance": _r(traj.distance),
        "relative_distance": _r(traj.relative_distance),
        "path_length": _r(traj.path_length),
      },
    },
    "parameters": {
      "selection": [f"{n}[{','.join(map(str, i))}]" for n, i in sel],
      "selected_by": ["top-k overall"] * n_top + ["top per layer"] * (len(sel) - n_top),
      "distance": [_r(p.distance) for p in lin_par],
      "linear_loss_span_0_1": [_r(span(p, 0.0, 1.0)) for p in lin_par],
      "linear_loss_span_all": [_r(span(p, -0.5, 1.5)) for p in lin_par],
      "quadratic_loss_span_all": [_r(span(p, -0.5, 1.5)) for p in quad_par],
      "linear": [path_json(p) for p in lin_par],
      "quadratic": [path_json(p) for p in quad_par],
    },
    "surface": {
      "axis": [-1.0, 1.0, args.grid],
      "cosine": cos,
      "center_loss": surf.center_loss,
      "grid_center_loss": float(z[c, c]),
      "min_loss": float(np.nanmin(z)),
      "min_at": _r([surf.x[imin[1]], surf.y[imin[0]]]),
      "max_loss": float(np.nanmax(z)),
      "rim_mean_loss": float(np.nanmean(rim)),
      "loss_x_axis": _r(z[c]),
      "loss_y_axis": _r(z[:, c]),
      "loss": [_r(row, 5) for row in z],
    },
    "pca": {
      "explained_variance_ratio": _r(pca.explained_variance_ratio),
      "explained_variance_ratio_sum": _r(pca.explained_variance_ratio.sum()),
      "coords": [_r(row) for row in coords],
      "residual_fraction": _r(resid),
      "true_loss": _r(true_loss),
      "plane_loss": _r(plane),
      "mean_abs_true_minus_plane": _r(np.mean(np.abs(true_loss - plane))),
      "max_abs_true_minus_plane": _r(np.max(np.abs(true_loss - plane))),
      "x": _r(pland.x),
      "y": _r(pland.y),
      "loss": [_r(row, 5) for row in pland.loss],
    },
  }
  timings["total"] = round(time.perf_counter() - t_start, 2)
  report["timings_s"] = timings
  json_path = resdir / "training_progress.json"
  text = record.dumps(report, indent=1)
  # Lists of numbers on one line each (the grids stay readable row by row).
  text = re.sub(r"\[\s+([-+0-9.eE,\snul]+?)\s+\]", lambda m: f"[{' '.join(m[1].split())}]", text)
  json_path.write_text(text + "\n")

  mae = pres["mae"]
  print("\n## Summary")
  print(
    f"final test loss {final_loss:.4f}, accuracy {true_acc[-1]:.4f} "
    f"({steps[-1]} steps; logged vs kernel max diff "
    f"{report['checkpoints']['max_abs_diff_logged_vs_kernel']:.1e})"
  )
  print(
    "| path | MAE at projected α | interior only | at e/E (nnvis) | at nearest point | "
    "mean distance to path / ‖θ_f − θ_0‖ |"
  )
  print("|---|---|---|---|---|---|")
  for k in pres["paths"]:
    print(
      f"| {k} | {mae['at_projected_alpha'][k]:.4f} | "
      f"{mae['at_projected_alpha_interior'][k]:.4f} | {mae['at_epoch_fraction'][k]:.4f} | "
      f"{mae['at_nearest_point'][k]:.4f} | "
      f"{np.mean(pres['nearest'][k]['relative_distance']):.3f} |"
    )
  print(
    f"closer: {pres['closer']} (linear/quadratic MAE ratio "
    f"{pres['mae_ratio_linear_over_quadratic']:.2f}); mid node epoch {pres['mid_index']}, "
    f"projected α_m = {pres['mid_projected_alpha']:.3f}"
  )
  print("| layer | ‖Δ‖ | ‖Δ‖/‖θ0‖ | path length | err reset τ=0 | err re-randomised | class |")
  print("|---|---|---|---|---|---|---|")
  rr = rob.rerandomized_error.mean(axis=0) if rob.rerandomized_error.size else [np.nan] * 9
  for j, n in enumerate(rob.layers):
    s = lstats[n]
    print(
      f"| {n} | {s['distance']:.3f} | {s['relative_distance']:.3f} | {s['path_length']:.3f} | "
      f"{rob.error[0, j]:.3f} | {rr[j]:.3f} | {rob.labels[n]} |"
    )
  print(f"base error {rob.base_error:.4f}, thresholds {rob.thresholds}")
  print(f"looser thresholds {LOOSER}: {report['layers']['robustness']['labels_looser']}")
  print(
    "parameter level: loss span over α∈[0,1] per scalar "
    + ", ".join(f"{v:.2g}" for v in report["parameters"]["linear_loss_span_0_1"])
  )
  print(
    f"surface: centre {surf.center_loss:.4f}, min {np.nanmin(z):.4f} at "
    f"{report['surface']['min_at']}, rim mean {np.nanmean(rim):.3f}, max {np.nanmax(z):.3f}, "
    f"cos(δ, η) = {cos:.4f}"
  )
  print(
    f"PCA: explained variance {pca.explained_variance_ratio.round(4).tolist()}, residual "
    f"fraction median {np.median(resid):.3f} max {resid.max():.3f}, |true − plane| mean "
    f"{np.mean(np.abs(true_loss - plane)):.4f}"
  )
  print(f"\nwrote {json_path} and {len(figures)} figures in {figdir} ({timings['total']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
