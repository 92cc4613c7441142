"""The analyses of :func:`jaxscope.analysis.analyze`: each computes its results, writes
``NAME.npz`` (the arrays, exact) + ``NAME.json`` (strict JSON: settings, evaluation set,
results) and its PNG figures, and adds its lines to the summary.

Each function takes the :class:`~jaxscope.analysis.run.RunAnalysis` of the call (the run's
model, evaluation set, checkpoints and their true losses) and returns a :class:`Written`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jaxscope.record import to_jsonable, write_atomic, write_json

if TYPE_CHECKING:
  from jaxscope.analysis.run import RunAnalysis

__all__ = ["Written", "landscape", "layers", "params", "path", "robustness", "trajectory"]

# Seeds 1 … N of the re-randomisation test.
_RERANDOMIZE_SEEDS = 3


class Written(NamedTuple):
  """What one analysis computed and wrote (see :class:`jaxscope.analysis.AnalysisResult`)."""

  value: Any
  arrays: dict[str, np.ndarray]
  meta: dict[str, Any]
  files: list[Path]


# ------------------------------------------------------------------------------ writers


def _save_result(
  out: Path, name: str, arrays: dict[str, Any], meta: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[Path]]:
  """``out/name.npz`` (the arrays, exact) and ``out/name.json`` (strict JSON); returns the
  arrays and the JSON object as written, and both paths."""
  npz, js = out / f"{name}.npz", out / f"{name}.json"
  data = {k: np.asarray(v) for k, v in arrays.items()}
  write_atomic(npz, lambda f: np.savez(f, **data))
  obj = to_jsonable({**meta, "arrays": sorted(data)})
  write_json(js, obj)
  return data, obj, [npz, js]


def _save_landscape(
  an: RunAnalysis, name: str, land: Any, extra: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[Path]]:
  """:func:`~jaxscope.analysis.save_landscape` to ``out/name``; returns the arrays and the
  JSON object it wrote, and both paths."""
  from jaxscope.analysis import save_landscape

  npz, js = save_landscape(an.out / name, land, **extra)
  data = {"x": land.x, "loss": land.loss, "accuracy": land.accuracy}
  if land.y is not None:
    data["y"] = land.y
  data.update({k: np.asarray(v) for k, v in extra.items()})
  return data, json.loads(js.read_text(encoding="utf-8")), [npz, js]


def _closest(alphas: Any, value: float) -> int | None:
  """The index of ``value`` in ``alphas`` (within 1e-9), or ``None``."""
  d = np.abs(np.asarray(alphas, np.float64) - value)
  i = int(np.argmin(d))
  return i if d[i] <= 1e-9 else None


# ------------------------------------------------------------------------------- paths


def _path_summary(an: RunAnalysis, checks: dict, maes: dict, meta: dict) -> None:
  mids = f", θ_mid = step {an.info['theta_mid']} at α = {an.mid_alpha:.3g}"
  an.say(
    f"path: θ_0 = step {an.steps[0]}, θ_f = step {an.steps[-1]}"
    + (mids if an.mid is not None else " (2 checkpoints: no quadratic path)")
  )
  for k, c in checks.items():
    an.say(
      f"  check {k}: path loss {c['path_loss']:.6g} vs checkpoint {c['checkpoint_loss']:.6g}"
      f" (|Δ| {c['abs_diff']:.2g})"
    )
  for kind, m in maes.items():
    an.say(f"  {kind:9s} mean |loss − true loss| over the checkpoints: {m:.4g}")
  if len(maes) == 2 and all(math.isfinite(v) for v in maes.values()):
    (k1, m1), (k2, m2) = sorted(maes.items(), key=lambda kv: kv[1])
    rel = f" ({100 * (m2 - m1) / m2:.0f} % less error)" if m2 > 0 else ""
    an.say(
      f"  → the {k1} path is closer to the real training curve than the {k2} one, by "
      f"{m2 - m1:.4g}{rel}"
    )
  if "trajectory" in meta:
    t = meta["trajectory"]
    an.say(
      f"  training moved θ by {t['distance']:.4g} ({100 * t['relative_distance']:.3g} % of "
      f"‖θ_0‖) along a path of length {t['path_length']:.4g}"
    )


def path(an: RunAnalysis) -> Written:
  """Model-level paths against the real training curve: ``path.npz``/``.json``/``.png``;
  the value is ``{kind: PathResult}``."""
  from jaxscope.analysis import path_error, project_on_path, trajectory_stats
  from jaxscope.plot import path_figure

  paths = an.model_paths()
  T = len(an.steps)
  alpha_t = project_on_path(an.first.params, an.final.params, (an.params(i) for i in range(T)))
  maes = {k: path_error(p, alpha_t, an.true_loss) for k, p in paths.items()}
  arrays: dict[str, Any] = {"alpha": an.alphas, "eval_indices": an.eval_indices}
  meta: dict[str, Any] = {"analysis": "path", **an.info, "paths": {}}
  for kind, p in paths.items():
    arrays[f"{kind}_loss"], arrays[f"{kind}_accuracy"] = p.loss, p.accuracy
    meta["paths"][kind] = {
      "alpha": p.alpha,
      "loss": p.loss,
      "accuracy": p.accuracy,
      "distance": p.distance,
      "mae_vs_checkpoints": maes[kind],
    }
  arrays.update(
    checkpoint_step=np.asarray(an.steps),
    checkpoint_alpha=alpha_t,
    checkpoint_loss=an.true_loss,
    checkpoint_accuracy=an.true_accuracy,
  )
  meta["checkpoints_on_path"] = {
    "step": an.steps,
    "alpha": alpha_t,
    "loss": an.true_loss,
    "accuracy": an.true_accuracy,
    "logged_eval_loss": an.logged_loss,
  }
  # Sanity (spec §7.8): the endpoints of the path reproduce the checkpoints' losses.
  checks = {}
  for a, j in ((0.0, 0), (1.0, T - 1)):
    i = _closest(an.alphas, a)
    if i is not None and not (a == 0.0 and an.has_state):
      checks[f"alpha={a:g}"] = {
        "path_loss": float(paths["linear"].loss[i]),
        "checkpoint_loss": float(an.true_loss[j]),
        "abs_diff": abs(float(paths["linear"].loss[i]) - float(an.true_loss[j])),
      }
  meta["endpoint_checks"] = checks
  if an.keep_all:
    st = trajectory_stats([an.params(i) for i in range(T)])
    meta["trajectory"] = {
      "distance": st.distance,
      "relative_distance": st.relative_distance,
      "path_length": st.path_length,
    }
  data, obj, files = _save_result(an.out, "path", arrays, meta)
  real = (alpha_t, an.true_loss, [str(s) for s in an.steps])
  files.append(an.save_fig(path_figure(list(paths.values()), real=real), "path.png"))
  _path_summary(an, checks, maes, meta)
  return Written(dict(paths), data, obj, files)


def _layer_classes(an: RunAnalysis, result: Any) -> dict[str, str] | None:
  """Critical / ambient / intermediate from a linear layer path at α = 0 (the
  re-initialisation test), for classification runs whose α grid holds 0."""
  from jaxscope.analysis import classify_layers

  i = _closest(an.alphas, 0.0)
  if i is None or an.task != "classification" or not result:
    return None
  names = list(result)
  err = [1.0 - float(result[n].accuracy[i]) for n in names]
  return classify_layers(
    err, 1.0 - float(an.true_accuracy[-1]), names, chance_error=1.0 - 1.0 / an.num_classes
  )


def layers(an: RunAnalysis) -> Written:
  """Layer-level paths and the layer classes: ``layers.npz``/``.json``,
  ``layers_KIND.png``; the value is ``{kind: {layer: PathResult}}``."""
  from jaxscope.analysis import layer_paths
  from jaxscope.plot import layer_paths_figure

  opts = an.options
  results = {}
  for kind, kw in an.kinds():
    results[kind] = layer_paths(
      an.apply_fn,
      an.eval_set,
      an.first.params,
      an.final.params,
      alphas=an.alphas,
      include=opts.layers,
      model_state=an.state_f,
      task=an.task,
      **kw,
    )
  names = list(results["linear"])
  classes = _layer_classes(an, results["linear"])
  arrays: dict[str, Any] = {
    "alpha": an.alphas,
    "layers": np.asarray(names),
    "distance": np.asarray([results["linear"][n].distance for n in names]),
    "eval_indices": an.eval_indices,
  }
  meta: dict[str, Any] = {"analysis": "layers", **an.info, "layers_regex": opts.layers}
  meta["layers"] = {n: {"distance": results["linear"][n].distance} for n in names}
  for kind, res in results.items():
    arrays[f"{kind}_loss"] = np.stack([res[n].loss for n in names])
    arrays[f"{kind}_accuracy"] = np.stack([res[n].accuracy for n in names])
    for n in names:
      meta["layers"][n][kind] = {"loss": res[n].loss, "accuracy": res[n].accuracy}
  if classes is not None:
    for n in names:
      meta["layers"][n]["class"] = classes[n]
    meta["classification"] = "from the linear path at α = 0 (re-initialisation to θ_0)"
  data, obj, files = _save_result(an.out, "layers", arrays, meta)
  model = an.model_paths()
  for kind, res in results.items():
    fig = layer_paths_figure(res, model[kind])
    files.append(an.save_fig(fig, f"layers_{kind}.png"))
  i0 = _closest(an.alphas, 0.0)
  an.say(f"layers ({len(names)}): distance ‖θ_f − θ_0‖, loss with the layer at θ_0, class")
  for n in names:
    r = results["linear"][n]
    at0 = f"{float(r.loss[i0]):.4g}" if i0 is not None else "n/a"
    cls = classes[n] if classes is not None else ""
    an.say(f"  {n:24s} {r.distance:10.4g} {at0:>10s}  {cls}")
  return Written(results, data, obj, files)


def params(an: RunAnalysis) -> Written:
  """Parameter-level paths of selected scalars: ``params.npz``/``.json``,
  ``params_KIND.png``; the value is ``{kind: [PathResult]}``."""
  from jaxscope.analysis import parameter_paths, select_parameters
  from jaxscope.plot import parameter_paths_figure

  opts = an.options
  how, k = opts.params
  sel = select_parameters(
    an.first.params, an.final.params, how=how, k=k, seed=opts.seed, include=opts.layers
  )
  results = {}
  for kind, kw in an.kinds():
    results[kind] = parameter_paths(
      an.apply_fn,
      an.eval_set,
      an.first.params,
      an.final.params,
      sel,
      alphas=an.alphas,
      model_state=an.state_f,
      task=an.task,
      **kw,
    )
  lin = results["linear"]
  arrays: dict[str, Any] = {
    "alpha": an.alphas,
    "names": np.asarray([r.name for r in lin]),
    "distance": np.asarray([r.distance for r in lin]),
    "eval_indices": an.eval_indices,
  }
  for kind, res in results.items():
    arrays[f"{kind}_loss"] = np.stack([r.loss for r in res])
    arrays[f"{kind}_accuracy"] = np.stack([r.accuracy for r in res])
  meta: dict[str, Any] = {
    "analysis": "params",
    **an.info,
    "selection": {"how": how, "k": k, "seed": opts.seed, "layers_regex": opts.layers},
    "parameters": [
      {
        "leaf": leaf,
        "index": list(idx),
        "distance": r.distance,
        **{kind: {"loss": res[j].loss} for kind, res in results.items()},
      }
      for j, ((leaf, idx), r) in enumerate(zip(sel, lin, strict=True))
    ],
  }
  data, obj, files = _save_result(an.out, "params", arrays, meta)
  for kind, res in results.items():
    files.append(an.save_fig(parameter_paths_figure(res), f"params_{kind}.png"))
  an.say(f"params: {len(sel)} scalars ({how}); largest |Δθ|:")
  for r in sorted(lin, key=lambda r: -r.distance)[:3]:
    spread = float(np.nanmax(r.loss) - np.nanmin(r.loss)) if np.isfinite(r.loss).any() else 0
    an.say(f"  {r.name:30s} |Δθ| {r.distance:.4g}, loss range along the path {spread:.3g}")
  return Written(results, data, obj, files)


# --------------------------------------------------------------------------- landscapes


def _landscape_directions(
  an: RunAnalysis, n: int, settings: dict[str, Any], extra: dict[str, Any]
) -> tuple[list[Any], dict[str, Any] | None]:
  """The ``n`` landscape directions (random or PCA, recorded in ``settings``) and, for
  PCA, the projected trajectory to draw (its coordinates also go into ``extra``)."""
  from jaxscope.analysis import cosine, project, random_directions

  opts = an.options
  if opts.directions == "random":
    dirs = random_directions(an.final.params, opts.seed, n=n)
    settings.update(directions="random", seed=opts.seed, norm="filter", ignore_1d="zero")
    settings["directions_note"] = "regenerate with random_directions(theta_f, seed, n)"
    if n == 2:
      settings["cosine"] = float(cosine(dirs[0], dirs[1]))
    return dirs, None
  pca = an.pca()
  if len(pca.directions) < n:
    raise ValueError(
      "analyze landscape: PCA directions of a 2-checkpoint run span one dimension; "
      "use --1d or --directions random."
    )
  dirs = pca.directions[:n]
  settings.update(
    directions="pca",
    explained_variance_ratio=pca.explained_variance_ratio[:n].tolist(),
    singular_values=pca.singular_values[:n].tolist(),
  )
  coords, _ = project(an.lazy(), an.final.params, dirs)
  extra.update(trajectory_coords=coords, trajectory_steps=np.asarray(an.steps))
  return dirs, {"coords": coords, "labels": [str(s) for s in an.steps], "loss": an.true_loss}


def landscape(an: RunAnalysis) -> Written:
  """The loss landscape around ``θ_f``: ``landscape.npz``/``.json``, ``landscape.png``
  (and ``landscape_surface.png`` in 2-D); the value is a ``Landscape``."""
  from jaxscope.analysis import landscape_1d, landscape_2d
  from jaxscope.plot import landscape_figure, surface_figure

  opts = an.options
  xgrid, ygrid = opts.grid
  xs = np.linspace(*xgrid)
  ys = None if opts.one_d else np.linspace(*ygrid)
  n = 1 if ys is None else 2
  settings: dict[str, Any] = {
    **an.info,
    "analysis": "landscape",
    "center": "theta_f",
    "center_step": an.steps[-1],
  }
  extra: dict[str, Any] = {"eval_indices": an.eval_indices}
  dirs, trajectory = _landscape_directions(an, n, settings, extra)
  kw = {"model_state": an.state_f, "task": an.task, "settings": to_jsonable(settings)}
  if n == 2:
    land = landscape_2d(an.apply_fn, an.eval_set, an.final.params, *dirs, xs, ys, **kw)
  else:
    land = landscape_1d(an.apply_fn, an.eval_set, an.final.params, dirs[0], xs, **kw)
  data, obj, files = _save_landscape(an, "landscape", land, extra)
  files.append(an.save_fig(landscape_figure(land, trajectory), "landscape.png"))
  if n == 2:
    files.append(an.save_fig(surface_figure(land), "landscape_surface.png"))
  shape = "×".join(str(s) for s in land.loss.shape[::-1])
  finite = land.loss[np.isfinite(land.loss)]
  rng = f"{finite.min():.4g} … {finite.max():.4g}" if finite.size else "no finite value"
  an.say(
    f"landscape: {opts.directions} directions, {shape} grid around step {an.steps[-1]}: loss {rng}"
  )
  an.say(
    f"  centre loss {land.center_loss:.6g} (checkpoint's own: {an.true_loss[-1]:.6g})"
    + (f"; cos(δ, η) = {settings['cosine']:.3g}" if "cosine" in settings else "")
  )
  if _closest(xs, 0.0) is None or (ys is not None and _closest(ys, 0.0) is None):
    an.say("  note: the grid does not contain the centre (0 on every axis).")
  return Written(land, data, obj, files)


def _trajectory_summary(an: RunAnalysis, pca: Any, plane_loss: Any, resid: Any) -> None:
  evr = ", ".join(f"{100 * r:.1f} %" for r in pca.explained_variance_ratio)
  an.say(
    f"trajectory: PCA of {len(an.steps)} checkpoints, explained variance {evr}; origin = "
    f"step {an.steps[-1]}"
  )
  an.say("  step      true loss   plane loss   off-plane fraction")
  rows = range(len(an.steps))
  if len(an.steps) > 8:
    rows = [*range(4), *range(len(an.steps) - 4, len(an.steps))]
  for i in rows:
    an.say(f"  {an.steps[i]:<8d} {an.true_loss[i]:10.4g} {plane_loss[i]:12.4g} {resid[i]:14.3f}")
  an.say(
    f"  (mean |plane − true| {np.mean(np.abs(plane_loss - an.true_loss)):.4g}: the "
    "contour under a checkpoint is not its loss unless its off-plane fraction is ≈ 0)"
  )


def trajectory(an: RunAnalysis) -> Written:
  """The loss on the trajectory's PCA plane (or line) with the checkpoints' true and
  plane losses: ``trajectory.npz``/``.json``/``.png``; the value is a ``Landscape``."""
  from jaxscope.analysis import landscape_1d, landscape_2d, make_point_evaluator, project
  from jaxscope.plot import landscape_figure

  pca = an.pca()
  dirs = pca.directions
  coords, resid = project(an.lazy(), an.final.params, dirs)
  grid = an.options.grid
  counts = [grid[0][2], grid[1][2]][: len(dirs)]
  axes = []
  for k, num in enumerate(counts):
    lo, hi = float(min(coords[:, k].min(), 0.0)), float(max(coords[:, k].max(), 0.0))
    span = hi - lo if hi > lo else max(abs(lo), abs(hi), 1e-3)
    axes.append(np.linspace(lo - 0.2 * span, hi + 0.2 * span, num))
  ev = make_point_evaluator(
    an.apply_fn, [an.final.params, *dirs], an.eval_set, model_state=an.state_f, task=an.task
  )
  plane = ev.evaluate(np.concatenate([np.ones((len(coords), 1)), coords], axis=1))
  settings: dict[str, Any] = {
    **an.info,
    "analysis": "trajectory",
    "directions": "pca",
    "pca_center": pca.center,
    "origin": "theta_f",
    "center_step": an.steps[-1],
    "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
    "explained_variance": pca.explained_variance.tolist(),
    "singular_values": pca.singular_values.tolist(),
    "grid_rule": "the projected checkpoints and the origin, with a 20 % margin per side",
    "checkpoints_projected": {
      "step": an.steps,
      "coords": coords,
      "true_loss": an.true_loss,
      "plane_loss": plane["loss"],
      "residual_fraction": resid,
    },
  }
  kw = {"model_state": an.state_f, "task": an.task, "settings": to_jsonable(settings)}
  if len(dirs) == 2:
    land = landscape_2d(an.apply_fn, an.eval_set, an.final.params, *dirs, *axes, **kw)
  else:
    land = landscape_1d(an.apply_fn, an.eval_set, an.final.params, dirs[0], axes[0], **kw)
  extra = {
    "steps": np.asarray(an.steps),
    "coords": coords,
    "true_loss": an.true_loss,
    "plane_loss": plane["loss"],
    "residual_fraction": resid,
    "explained_variance_ratio": pca.explained_variance_ratio,
    "eval_indices": an.eval_indices,
  }
  data, obj, files = _save_landscape(an, "trajectory", land, extra)
  traj = {"coords": coords, "labels": [str(s) for s in an.steps], "loss": an.true_loss}
  where = "plane" if len(dirs) == 2 else "first principal direction"
  fig = landscape_figure(land, traj, title=f"loss on the trajectory's PCA {where}")
  files.append(an.save_fig(fig, "trajectory.png"))
  _trajectory_summary(an, pca, plane["loss"], resid)
  return Written(land, data, obj, files)


# --------------------------------------------------------------------------- robustness


def robustness(an: RunAnalysis) -> Written:
  """Re-initialisation and re-randomisation of each layer (classification runs):
  ``robustness.npz``/``.json``/``.png``; the value is a ``RobustnessResult``."""
  import jax.numpy as jnp

  from jaxscope.analysis import layer_robustness
  from jaxscope.plot import robustness_figure

  if an.task != "classification":
    raise ValueError(f"analyze robustness: needs a classification run, not {an.task}.")
  model, x = an.model, jnp.asarray(an.init_x)
  res = layer_robustness(
    an.apply_fn,
    an.eval_set,
    [an.params(i) for i in range(len(an.steps))],
    an.steps,
    num_classes=an.num_classes,
    init_fn=lambda key: model.init(key, x)["params"],
    seeds=_RERANDOMIZE_SEEDS,
    include=an.options.layers,
    model_state=an.state_f,
  )
  arrays = {
    "layers": np.asarray(res.layers),
    "steps": np.asarray(res.steps),
    "error": res.error,
    "loss": res.loss,
    "rerandomized_error": res.rerandomized_error,
    "eval_indices": an.eval_indices,
  }
  meta = {
    "analysis": "robustness",
    **an.info,
    "layers_regex": an.options.layers,
    "layers": list(res.layers),
    "steps": list(res.steps),
    "base_error": res.base_error,
    "labels": res.labels,
    "thresholds": res.thresholds,
    "rerandomize_seeds": list(range(1, _RERANDOMIZE_SEEDS + 1)),
    "note": "ambient = robust (Zhang et al.); the nnvis thesis's 'robust' means critical",
  }
  data, obj, files = _save_result(an.out, "robustness", arrays, meta)
  files.append(an.save_fig(robustness_figure(res), "robustness.png"))
  th = res.thresholds
  an.say(
    f"robustness: base error {res.base_error:.4f}; ambient if Δerr ≤ {th['ambient_tol']:g}, "
    f"critical if err ≥ {th['chance_error'] - th['critical_tol']:.3g}"
  )
  rer = res.rerandomized_error
  for j, lay in enumerate(res.layers):
    rr = f", re-randomised {np.mean(rer[:, j]):.3f}" if len(rer) else ""
    an.say(
      f"  {lay:24s} {res.labels[lay]:12s} error at τ = {res.steps[0]}: {res.error[0, j]:.3f}{rr}"
    )
  return Written(res, data, obj, files)
