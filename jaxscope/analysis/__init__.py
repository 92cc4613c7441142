"""Checkpoint-fed analyses on one compiled evaluation kernel.

* :mod:`~jaxscope.analysis.directions`: filter-normalised random directions;
* :mod:`~jaxscope.analysis.pca`: streamed PCA of the trajectory and projection onto its
  plane;
* :mod:`~jaxscope.analysis.kernel`: the fixed evaluation set and the point evaluator
  (``θ(c) = Σ_j c[j, g] B_j``, ``vmap`` over points, ``scan`` over batches);
* :mod:`~jaxscope.analysis.paths`: linear and quadratic paths at model, layer and
  parameter level, checkpoints projected on the path, trajectory distances;
* :mod:`~jaxscope.analysis.landscape`: 1-D and 2-D loss landscapes, saved as npz + json;
* :mod:`~jaxscope.analysis.robustness`: re-initialisation heat-maps, re-randomisation and
  the critical / ambient classification of layers (Zhang, Bengio & Singer);
* :mod:`~jaxscope.analysis.run`: the run-level API, :func:`analyze` (what
  ``jaxscope analyze`` does: every analysis of a run's checkpoints, written and returned),
  with the analyses' file and summary writers in :mod:`~jaxscope.analysis.reports`.
"""

from jaxscope.analysis.directions import cosine, filter_normalize, random_directions
from jaxscope.analysis.kernel import (
  EvalSet,
  PointEvaluator,
  chunk_size,
  make_batch_evaluator,
  make_eval_set,
  make_point_evaluator,
  recompute_statistics,
)
from jaxscope.analysis.landscape import (
  Landscape,
  landscape_1d,
  landscape_2d,
  load_landscape,
  save_landscape,
)
from jaxscope.analysis.paths import (
  PathResult,
  TrajectoryStats,
  lagrange_weights,
  layer_paths,
  linear_weights,
  model_path,
  parameter_paths,
  path_error,
  project_on_path,
  select_parameters,
  trajectory_stats,
)
from jaxscope.analysis.pca import LazyCheckpoints, PCAResult, pca_directions, project
from jaxscope.analysis.robustness import RobustnessResult, classify_layers, layer_robustness
from jaxscope.analysis.run import (
  ANALYSES,
  AnalysisOptions,
  AnalysisReport,
  AnalysisResult,
  RunLike,
  analyze,
)

__all__ = [
  "ANALYSES",
  "AnalysisOptions",
  "AnalysisReport",
  "AnalysisResult",
  "EvalSet",
  "Landscape",
  "LazyCheckpoints",
  "PCAResult",
  "PathResult",
  "PointEvaluator",
  "RobustnessResult",
  "RunLike",
  "TrajectoryStats",
  "analyze",
  "chunk_size",
  "classify_layers",
  "cosine",
  "filter_normalize",
  "lagrange_weights",
  "landscape_1d",
  "landscape_2d",
  "layer_paths",
  "layer_robustness",
  "linear_weights",
  "load_landscape",
  "make_batch_evaluator",
  "make_eval_set",
  "make_point_evaluator",
  "model_path",
  "parameter_paths",
  "path_error",
  "pca_directions",
  "project",
  "project_on_path",
  "random_directions",
  "recompute_statistics",
  "save_landscape",
  "select_parameters",
  "trajectory_stats",
]
