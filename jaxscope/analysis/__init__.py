"""Checkpoint-fed analyses on one compiled evaluation kernel.

* :mod:`~jaxscope.analysis.kernel`: the fixed evaluation set and the point evaluator
  (``θ(c) = Σ_j c[j, g] B_j``, ``vmap`` over points, ``scan`` over batches);
* :mod:`~jaxscope.analysis.paths`: linear and quadratic paths at model, layer and
  parameter level, checkpoints projected on the path, trajectory distances.
"""

from jaxscope.analysis.kernel import (
  EvalSet,
  PointEvaluator,
  chunk_size,
  make_batch_evaluator,
  make_eval_set,
  make_point_evaluator,
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

__all__ = [
  "EvalSet",
  "PathResult",
  "PointEvaluator",
  "TrajectoryStats",
  "chunk_size",
  "lagrange_weights",
  "layer_paths",
  "linear_weights",
  "make_batch_evaluator",
  "make_eval_set",
  "make_point_evaluator",
  "model_path",
  "parameter_paths",
  "path_error",
  "project_on_path",
  "select_parameters",
  "trajectory_stats",
]
