"""The reference training loop: a jitted step, evaluation, recorder, checkpoints.

:func:`train` runs a :class:`TrainConfig` end to end and writes a run directory::

    run_dir/config.json       the configuration (and library versions)
    run_dir/metrics.jsonl     per-step values: loss, train/accuracy, lr, the scope's
                              {topic}/{stat}/{layer} metrics, test/loss, test/accuracy;
                              with the presets economy/business/full also Cockpit's
                              instruments (alpha, norm_test, hess_trace, …) and the
                              activation health (activations/std/{layer}, …)
    run_dir/checkpoints/      orbax checkpoints (init, every k steps, final) with metadata
    run_dir/tensorboard/      with ``tensorboard=True``

Steps are counted as optimizer updates: the values recorded at step ``k`` are measured
on the parameters ``θ_k`` *before* the ``k``-th update (the scope's ``params``, the
batch loss), and the evaluation and checkpoint at step ``k`` hold ``θ_k`` as well, so
step 0 is the initialisation and the last step is the trained model.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from
``(seed, e)``, and dropout keys are ``fold_in(key(seed), step)``, so a run is a pure
function of its configuration: the same seed gives the same ``metrics.jsonl`` bit for
bit on the same machine, and a resumed run continues exactly as the uninterrupted one.

The package's modules: :mod:`~jaxscope.train.optim` (optimizers and schedules by name),
:mod:`~jaxscope.train.measure` (the scope, instruments and activation health of a
``metrics`` setting), :mod:`~jaxscope.train.step` (the pure train step),
:mod:`~jaxscope.train.evaluate` (the test-split evaluation, the analyses' kernel) and
:mod:`~jaxscope.train.build` (:func:`setup`: what a run is built from) and
:mod:`~jaxscope.train.loop` (:func:`train`). The configuration,
:class:`~jaxscope.run.TrainConfig`, is the run directory's schema (:mod:`jaxscope.run`).
The lower-level pieces (:func:`make_optimizer`, :func:`make_schedule`,
:func:`make_scope`, :func:`make_train_step`, :func:`make_evaluate`) are public, for
loops of your own and for the benchmarks.
"""

from jaxscope.run.config import CAPACITY_DEFAULTS, TrainConfig, parse_capacity
from jaxscope.train.build import Setup, setup
from jaxscope.train.evaluate import make_evaluate
from jaxscope.train.loop import TrainResult, train
from jaxscope.train.measure import (
  ACTIVATION_METRICS,
  PRESET_SCOPES,
  make_activation_scope,
  make_instruments,
  make_scope,
)
from jaxscope.train.optim import (
  HVP_OPTIMIZERS,
  OPTIMIZERS,
  Optimizer,
  build_optimizer,
  make_optimizer,
  make_schedule,
  updates_in_span,
)
from jaxscope.train.step import TrainState, init_instruments, make_train_step

__all__ = [
  "ACTIVATION_METRICS",
  "CAPACITY_DEFAULTS",
  "HVP_OPTIMIZERS",
  "OPTIMIZERS",
  "PRESET_SCOPES",
  "Optimizer",
  "Setup",
  "TrainConfig",
  "TrainResult",
  "TrainState",
  "build_optimizer",
  "init_instruments",
  "make_activation_scope",
  "make_evaluate",
  "make_instruments",
  "make_optimizer",
  "make_schedule",
  "make_scope",
  "make_train_step",
  "parse_capacity",
  "setup",
  "train",
  "updates_in_span",
]
