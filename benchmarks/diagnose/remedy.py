"""Advice that fixes: the config change that follows each finding's advice, and its use.

:data:`REMEDY` maps a finding name to an *action*, a named change of the run's config
(:data:`ACTIONS`): the first item of the finding's advice (``jaxscope.diagnose``) that a
config change can express, or the benchmark's chosen reading of it. Findings whose advice
no config change expresses map to ``None`` (:data:`NOT_AUTOMATIC` says why). An action
may read the finding's ``values`` (``lr_up`` takes the ``suggested_factor`` that
``lr_too_low`` states, ``lr_down`` the one a regression run's ``divergence`` states).

The benchmark re-runs a flagged faulty run with the action of its first alarm and then,
as a user would, diagnoses the rerun and follows the advice of *its* first alarm, on top,
while the diagnosis still raises an alarm, up to :data:`ROUNDS` runs
(:func:`train_remedy`). The baseline does the same with a random *other* action in each
round (drawn uniformly among the actions that differ from the advised one, seeded by the
run's id and the round). A rerun is fixed when the outcome of its last round is healthy by
the same ground-truth rule; the first round's outcome is reported too.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections.abc import Callable
from typing import Any

__all__ = [
  "ACTIONS", "BY_VALUE", "FOLLOW_UP", "NOT_AUTOMATIC", "REMEDY", "REPEATABLE", "ROUNDS",
  "apply_action", "first_alarm", "next_remedy", "other_action", "remedy_of", "train_remedy",
]  # fmt: skip

#: An action: changes a job's ``fields`` in place, given the job and the values of the
#: finding whose advice it follows (``{}`` for a random action).
Action = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]


def _lr(factor: float, suggested: bool = False) -> Action:
  """Learning rate times ``factor``; with ``suggested``, times the finding's
  ``suggested_factor`` when it states one on the same side of 1."""

  def act(fields: dict[str, Any], job: dict[str, Any], values: dict[str, Any]) -> None:
    from benchmarks.diagnose.tasks import TASKS

    f = float(values.get("suggested_factor") or factor) if suggested else factor
    if (f - 1.0) * (factor - 1.0) <= 0:  # A stated factor that turns the change around.
      f = factor
    fields["lr"] = fields.get("lr", TASKS[job["task"]].lr) * f

  return act


def _steps(factor: float) -> Action:
  def act(fields: dict[str, Any], job: dict[str, Any], values: dict[str, Any]) -> None:
    fields["steps_frac"] = fields.get("steps_frac", 1.0) * factor

  return act


def _data(**kw: Any) -> Action:
  def act(fields: dict[str, Any], job: dict[str, Any], values: dict[str, Any]) -> None:
    fields["data_args"] = {**fields.get("data_args", {}), **kw}

  return act


def _model(**kw: Any) -> Action:
  def act(fields: dict[str, Any], job: dict[str, Any], values: dict[str, Any]) -> None:
    fields["model_args"] = {**fields.get("model_args", {}), **kw}

  return act


def _less_dropout(fields: dict[str, Any], job: dict[str, Any], values: dict[str, Any]) -> None:
  model_args = fields.get("model_args", {})
  fields["model_args"] = {**model_args, "dropout": min(0.1, model_args.get("dropout", 0.0))}


def _schedule(name: str) -> Action:
  def act(fields: dict[str, Any], job: dict[str, Any], values: dict[str, Any]) -> None:
    fields["schedule"] = name

  return act


#: The actions: ``name -> (what it changes, function(fields, job) changing fields in place)``.
ACTIONS: dict[str, tuple[str, Action]] = {
  "lr_down": ("learning rate x the finding's suggested factor (x 0.1 when it states none)",
              _lr(0.1, suggested=True)),
  "lr_up": ("learning rate x the finding's suggested factor (x 10 when it states none)",
            _lr(10.0, suggested=True)),
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
  "positive_biases": ("hidden biases initialised at 0.01", _model(hidden_bias=0.01)),
  "fan_in_init": (
    "the standard fan-in init (LeCun normal: variance 1/fan-in, Flax's Dense default), kernel "
    "scale 1, zero biases",
    _model(init_mode="lecun", kernel_scale=1.0, hidden_bias=0.0),
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
  "dead_units": "lr_down",  # lower the learning rate (dead from the start: BY_VALUE)
  "bad_init_scale": "fan_in_init",  # scale down to the fan-in scale (too small: BY_VALUE)
  "saturation": "scaled_init",  # an initialisation scaled to the activation
  "vanishing_gradients": "scaled_init",  # an initialisation scaled to the activation
  "loss_output_mismatch": "logits_output",  # remove the final softmax
  "stalled_layers": "unfreeze",  # check these layers receive gradients (stop_gradient)
  "dropout_too_strong": "less_dropout",
  "label_noise": None,
  "lost_updates": None,
}

#: ``finding name -> (value name, value, action)``: the remedy when the finding states that
#: value, in place of :data:`REMEDY`'s (its advice opens differently by what it measured).
BY_VALUE: dict[str, tuple[str, Any, str]] = {
  "bad_init_scale": ("initial_scale", "too small", "scaled_init"),  # scale up: He
  "dead_units": ("dead_from_start", True, "positive_biases"),  # the init put them there
}


def remedy_of(finding: str, values: dict[str, Any] | None = None) -> str | None:
  """The remedy of ``finding`` whose values are ``values``: :data:`BY_VALUE`'s where the
  finding states its value, else :data:`REMEDY`'s (``None``: no automatic remedy)."""
  key, value, action = BY_VALUE.get(finding, (None, None, None))
  if key is not None and (values or {}).get(key) == value:
    return action
  return REMEDY.get(finding)


#: The later advice items a config change expresses, in the advice's order: a chain takes
#: them when the finding is raised again after its first remedy was applied (that remedy
#: changes nothing the second time, unless it is :data:`REPEATABLE`).
FOLLOW_UP: dict[str, tuple[str, ...]] = {
  "dead_units": ("scaled_init", "lr_down"),  # He init, zero biases; the learning rate
  "early_plateau": ("scaled_init", "standardize"),  # its first and second items
  "late_plateau": ("scaled_init",),  # try another initialisation
  "saturation": ("standardize",),  # normalise the inputs
}

#: Actions that change the config again each time they are applied (the others, applied
#: twice, change nothing).
REPEATABLE = frozenset({"lr_down", "lr_up", "more_steps"})

#: Why a finding has no automatic remedy.
NOT_AUTOMATIC = {
  "label_noise": "relabelling the data is no config change",
  "lost_updates": "the runs train in float32 already (a float32 master copy is the advice)",
}


def apply_action(
  job: dict[str, Any], action: str, values: dict[str, Any] | None = None
) -> dict[str, Any]:
  """A copy of ``job`` whose ``fields`` carry ``action`` (a key of :data:`ACTIONS`),
  reading ``values`` (the values of the finding whose advice it follows)."""
  if action not in ACTIONS:
    raise ValueError(f"apply_action: action must be one of {sorted(ACTIONS)}, got {action!r}.")
  out = copy.deepcopy(job)
  fields = dict(out["fields"])
  ACTIONS[action][1](fields, out, dict(values or {}))
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


#: Most runs of one advice chain: the first remedy, then the remedies of the reruns'
#: first alarms while the diagnosis still raises one.
ROUNDS = 3


def first_alarm(run_dir: str) -> tuple[str | None, dict[str, Any]]:
  """The name and values of the first alarm (critical or warning) of ``run_dir``'s
  diagnosis, or ``(None, {})`` when it raises none."""
  from jaxscope.diagnose import diagnose

  for f in diagnose(run_dir):
    if f.severity in ("critical", "warning"):
      return f.name, dict(f.evidence.get("values") or {})
  return None, {}


def next_remedy(
  finding: str, applied: list[str], values: dict[str, Any] | None = None
) -> str | None:
  """The remedy a chain applies for ``finding`` (with ``values``) after ``applied``: the
  first of its remedy (:func:`remedy_of`) and :data:`FOLLOW_UP` that is
  :data:`REPEATABLE` or not applied yet; ``None`` when it has no automatic remedy or all of
  them were applied."""
  for action in (remedy_of(finding, values), *FOLLOW_UP.get(finding, ())):
    if action is not None and (action in REPEATABLE or action not in applied):
      return action
  return None


def train_remedy(
  job: dict[str, Any],
  train: Callable[[dict[str, Any]], dict[str, Any]],
  alarm: Callable[[str], tuple[str | None, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
  """One advice chain: ``job["chain"] = (which, action, values, rounds)``.

  Round 1 trains ``job`` with ``action`` (reading ``values``). After each round the
  rerun is diagnosed (``alarm(run_dir)``, default :func:`first_alarm`; a run stopped by
  a divergence with no alarm counts as ``"divergence"``). While it raises an alarm and
  fewer than ``rounds`` runs have trained, the next round applies, on top of the last
  config, the remedy of that alarm (``which="top"``, :func:`next_remedy`: its first
  remedy, or a follow-up once that was applied; the chain ends when it has none) or
  a random other action (``which="other"``, :func:`other_action` seeded by the run's id
  and the round). Round ``k`` trains in ``job["run_dir"] + "-r{k}"``.

  Returns:
    The last round's row, with ``rounds``: per round ``{"action", "row"}``.
  """
  from benchmarks.diagnose.tasks import TASKS

  alarm = alarm or first_alarm
  which, action, values, most = job["chain"]
  base = {k: v for k, v in job.items() if k != "chain"}
  classification = TASKS[job["task"]].classification
  done: list[dict[str, Any]] = []
  while True:
    base = apply_action(base, action, values)
    row = train({**base, "run_dir": f"{job['run_dir']}-r{len(done) + 1}"})
    done.append({"action": action, "row": row})
    if len(done) >= most:
      break
    name, values = alarm(row["run_dir"])
    if name is None and row.get("stopped"):
      name, values = "divergence", {}
    if name is None:
      break
    advised = next_remedy(name, [r["action"] for r in done], values)
    if which == "top":
      if advised is None:
        break
      action = advised
    else:
      action, values = other_action(f"{job['id']}#{len(done)}", advised, classification), {}
  return {**row, "rounds": done}
