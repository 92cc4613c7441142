"""Advice that fixes: the config change that follows each finding's advice, and its use.

:data:`REMEDY` maps a finding name to an *action*, a named change of the run's config
(:data:`ACTIONS`): the first item of the finding's advice (``jaxscope.diagnose``) that a
config change can express, or the benchmark's chosen reading of it. Findings whose advice
no config change expresses map to ``None`` (:data:`NOT_AUTOMATIC` says why). The
benchmark re-runs a flagged faulty run with the action of its first alarm and, as the
baseline, with a random *other* action (drawn uniformly among the actions that differ from
it, seeded by the run's id), and counts a rerun as fixed when its outcome is healthy by the
same ground-truth rule.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections.abc import Callable
from typing import Any

__all__ = [
  "ACTIONS", "NOT_AUTOMATIC", "REMEDY", "REPEAT", "apply_action", "other_action", "train_remedy",
]  # fmt: skip


def _lr(factor: float) -> Callable[[dict[str, Any], dict[str, Any]], None]:
  def act(fields: dict[str, Any], job: dict[str, Any]) -> None:
    from benchmarks.diagnose.tasks import TASKS

    fields["lr"] = fields.get("lr", TASKS[job["task"]].lr) * factor

  return act


def _steps(factor: float) -> Callable[[dict[str, Any], dict[str, Any]], None]:
  def act(fields: dict[str, Any], job: dict[str, Any]) -> None:
    fields["steps_frac"] = fields.get("steps_frac", 1.0) * factor

  return act


def _data(**kw: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
  def act(fields: dict[str, Any], job: dict[str, Any]) -> None:
    fields["data_args"] = {**fields.get("data_args", {}), **kw}

  return act


def _model(**kw: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
  def act(fields: dict[str, Any], job: dict[str, Any]) -> None:
    fields["model_args"] = {**fields.get("model_args", {}), **kw}

  return act


def _less_dropout(fields: dict[str, Any], job: dict[str, Any]) -> None:
  model_args = fields.get("model_args", {})
  fields["model_args"] = {**model_args, "dropout": min(0.1, model_args.get("dropout", 0.0))}


def _schedule(name: str) -> Callable[[dict[str, Any], dict[str, Any]], None]:
  def act(fields: dict[str, Any], job: dict[str, Any]) -> None:
    fields["schedule"] = name

  return act


#: The actions: ``name -> (what it changes, function(fields, job) changing fields in place)``.
ACTIONS: dict[str, tuple[str, Callable[[dict[str, Any], dict[str, Any]], None]]] = {
  "lr_down": ("learning rate x 0.1, again while the rerun diverges (up to 3 times)", _lr(0.1)),
  "lr_up": ("learning rate x 10", _lr(10.0)),
  "more_steps": ("steps x 4", _steps(4.0)),
  "lr_decay": ("cosine learning-rate decay over the run", _schedule("cosine")),
  "standardize": ("inputs standardised (training mean and std)", _data(standardize=True)),
  "drop_nonfinite": ("training examples with NaN/Inf dropped", _data(drop_nonfinite=True)),
  "rebalance": ("classes over-sampled to equal counts", _data(rebalance=True)),
  "scaled_init": (
    "init scaled to the activation (He for ReLU, Glorot for tanh), kernel scale 1, zero "
    "biases",
    _model(init_mode="scaled", kernel_scale=1.0, hidden_bias=0.0),
  ),
  "logits_output": ("the model returns logits (final softmax/sigmoid removed)",
                    _model(output="logits")),
  "unfreeze": ("stop_gradient removed (every layer trains)", _model(frozen=0)),
  "less_dropout": ("dropout rate at most 0.1", _less_dropout),
  "stop_early": ("steps / 2 (stop early)", _steps(0.5)),
}  # fmt: skip

#: ``finding name -> action`` (``None``: no automatic remedy). The comment is the advice
#: item it follows.
REMEDY: dict[str, str | None] = {
  "divergence": "lr_down",  # lower the learning rate (e.g. by 10x)
  "instability": "lr_down",  # lower the learning rate (shuffling: already done)
  "oscillation": "lr_down",  # lower the learning rate (shuffling: already done)
  "update_ratio_high": "lr_down",  # lower the learning rate
  "lr_above_curvature_limit": "lr_down",  # below the curvature limit
  "exploding_gradients": "lr_down",  # (clip: not a config option) lower the learning rate
  "lr_too_low": "lr_up",
  "update_ratio_low": "lr_up",  # raise the learning rate
  "early_plateau": "lr_up",  # a larger learning rate (the benchmark's reading)
  "too_few_steps": "more_steps",  # train for more steps
  "late_plateau": "lr_decay",  # decay the learning rate
  "overfitting": "stop_early",  # stop early at the minimum test loss
  "unnormalised_inputs": "standardize",
  "nonfinite_data": "drop_nonfinite",
  "class_imbalance": "rebalance",  # over-sample the rare classes
  "dead_units": "scaled_init",  # (lower lr: the benchmark's reading is) He init, zero biases
  "bad_init_scale": "scaled_init",
  "saturation": "scaled_init",  # an initialisation scaled to the activation
  "vanishing_gradients": "scaled_init",  # an initialisation scaled to the activation
  "loss_output_mismatch": "logits_output",  # remove the final softmax
  "stalled_layers": "unfreeze",  # check these layers receive gradients (stop_gradient)
  "dropout_too_strong": "less_dropout",
  "label_noise": None,
  "lost_updates": None,
}

#: Why a finding has no automatic remedy.
NOT_AUTOMATIC = {
  "label_noise": "relabelling the data is no config change",
  "lost_updates": "the runs train in float32 already (a float32 master copy is the advice)",
}


def apply_action(job: dict[str, Any], action: str) -> dict[str, Any]:
  """A copy of ``job`` whose ``fields`` carry ``action`` (a key of :data:`ACTIONS`)."""
  if action not in ACTIONS:
    raise ValueError(f"apply_action: action must be one of {sorted(ACTIONS)}, got {action!r}.")
  out = copy.deepcopy(job)
  fields = dict(out["fields"])
  ACTIONS[action][1](fields, out)
  out["fields"] = fields
  return out


def other_action(run_id: str, exclude: str | None, classification: bool = True) -> str:
  """A random action other than ``exclude``, drawn uniformly (seeded by ``run_id``, so a
  repeated benchmark draws the same); ``rebalance`` and ``logits_output`` only for
  classification."""
  pool = [
    a for a in ACTIONS
    if a != exclude and (classification or a not in ("rebalance", "logits_output"))
  ]  # fmt: skip
  return random.Random(zlib.crc32(run_id.encode())).choice(pool)


#: Actions the advice says to repeat while the rerun still diverges (the divergence
#: advice: "lower the learning rate by 10×, and again while it still diverges"): ``action
#: -> most tries``. Their reruns train with ``stop_on="divergence"``, so a try that
#: diverges ends there.
REPEAT: dict[str, int] = {"lr_down": 3}


def train_remedy(
  job: dict[str, Any], train: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
  """``train(job)``; for a job with ``job["repeat"] = (action, tries)``, the action applied
  again and the job retrained while the rerun was stopped by a divergence, up to ``tries``
  runs in all. The row's ``tries`` says how many ran."""
  row = train(job)
  tries = 1
  if "repeat" in job:
    action, most = job["repeat"]
    while row.get("stopped") and tries < most:
      job = apply_action(job, action)
      row = train(job)
      tries += 1
  return {**row, "tries": tries}
