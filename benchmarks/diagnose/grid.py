"""The grid of the diagnosis benchmark: the fault families, the healthy pools, what names
each cause, and one training run of the grid.

Every run is :func:`jaxscope.train.train` of :class:`benchmarks.diagnose.faults.FaultyMLP`
(hidden 128 → 64, ReLU) on a task of :mod:`benchmarks.diagnose.tasks`, SGD with momentum
0.9 at the task's lr, batch 64, the ``economy`` metrics and ``live_diagnosis=False``;
a fault changes some of these fields (:data:`FAULTS`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.diagnose.tasks import TASKS, Task

__all__ = [
  "ACCEPTABLE", "BASE", "CLASS_ONLY", "DATA", "FAULTS", "MODEL", "QUICK", "Variant",
  "build_config", "grid", "loss_events", "make_jobs", "stress", "train_one",
]  # fmt: skip

DATA = "benchmarks.diagnose.faults:load_faulty"
MODEL = "benchmarks.diagnose.faults:faulty_mlp"
BASE: dict[str, Any] = {"batch_size": 64, "optimizer": "momentum"}
#: The deep stack of the exploding / vanishing families: six hidden layers of 32, no
#: normalisation (at the default init it trains, a little slower than the two-layer MLP).
DEEP = [32] * 6
#: The divergence factor of ``--stop-on divergence`` and of the divergence rule.
DIVERGENCE_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class Variant:
  """One setting of the grid on one task: a fault at one severity, or a healthy setting."""

  task: str
  pool: str
  """``"fault"``, ``"healthy"`` (standard settings) or ``"stress"`` (healthy, unusual)."""
  family: str
  severity: int
  """1 (mild) or 2 (severe); 0 for the healthy pools."""
  setting: str
  fields: dict[str, Any]
  """TrainConfig fields over :data:`BASE` (``steps`` as a fraction of the task's:
  ``steps_frac``; ``data_args`` / ``model_args`` merged)."""


def _deep(scale: float) -> dict[str, Any]:
  return {"hidden_sizes": DEEP, "kernel_scale": scale}


#: The fault families: ``family -> [(severity, setting, fields), ...]``.
FAULTS: dict[str, list[tuple[int, str, dict[str, Any]]]] = {
  "lr_too_high": [(1, "lr 1", {"lr": 1.0}), (2, "lr 10", {"lr": 10.0})],
  "lr_too_low": [(1, "lr 1e-3", {"lr": 1e-3}), (2, "lr 1e-4", {"lr": 1e-4})],
  "nan_data": [
    (1, "1 training example with a NaN entry", {"data_args": {"nan_fraction": 1e-4}}),
    (2, "2 % of training examples with a NaN entry", {"data_args": {"nan_fraction": 0.02}}),
  ],
  "label_noise": [
    (1, "50 % of training labels random", {"data_args": {"label_noise": 0.5}}),
    (2, "80 % of training labels random", {"data_args": {"label_noise": 0.8}}),
  ],
  "label_shift": [
    (1, "40 % of training labels moved to the next class", {"data_args": {"label_shift": 0.4}}),
    (2, "all training labels moved to the next class", {"data_args": {"label_shift": 1.0}}),
  ],
  "class_imbalance": [
    (1, "upper half of the classes keeps 10 %", {"data_args": {"minority_keep": 0.1}}),
    (2, "upper half of the classes keeps 2 %", {"data_args": {"minority_keep": 0.02}}),
  ],
  "unnormalised_inputs": [
    (1, "inputs x 16", {"data_args": {"input_scale": 16.0}}),
    (2, "inputs x 255 (raw pixels)", {"data_args": {"input_scale": 255.0}}),
  ],
  "bad_init_scale": [
    (1, "kernel init x 5", {"model_args": {"kernel_scale": 5.0}}),
    (2, "kernel init x 20", {"model_args": {"kernel_scale": 20.0}}),
  ],
  "exploding_gradients": [
    (1, "6 x 32 ReLU layers, kernel init x 2.5", {"model_args": _deep(2.5)}),
    (2, "6 x 32 ReLU layers, kernel init x 4", {"model_args": _deep(4.0)}),
  ],
  "vanishing_gradients": [
    (1, "6 x 32 ReLU layers, kernel init x 0.5", {"model_args": _deep(0.5)}),
    (2, "6 x 32 ReLU layers, kernel init x 0.25", {"model_args": _deep(0.25)}),
  ],
  "saturated_activations": [
    (1, "tanh, kernel init x 10", {"model_args": {"activation": "tanh", "kernel_scale": 10.0}}),
    (2, "tanh, kernel init x 30", {"model_args": {"activation": "tanh", "kernel_scale": 30.0}}),
  ],
  "dead_relu": [
    (1, "hidden biases -1", {"model_args": {"hidden_bias": -1.0}}),
    (2, "hidden biases -3", {"model_args": {"hidden_bias": -3.0}}),
  ],
  "frozen_layers": [
    (1, "fc1 gets no gradient", {"model_args": {"frozen": 1}}),
    (2, "fc1 and fc2 get no gradient", {"model_args": {"frozen": 2}}),
  ],
  "dropout_too_strong": [
    (1, "dropout 0.8 after each hidden layer", {"model_args": {"dropout": 0.8}}),
    (2, "dropout 0.9 after each hidden layer", {"model_args": {"dropout": 0.9}}),
  ],
  "loss_output_mismatch": [
    (1, "sigmoid outputs (a BCE model), softmax loss", {"model_args": {"output": "sigmoid"}}),
    (2, "softmax outputs, log-softmax again in the loss", {"model_args": {"output": "softmax"}}),
  ],
  "too_few_steps": [
    (1, "1/4 of the steps", {"steps_frac": 0.25}),
    (2, "1/12 of the steps", {"steps_frac": 1 / 12}),
  ],
  "small_batch_high_lr": [
    (1, "batch 8, lr 0.5", {"batch_size": 8, "lr": 0.5}),
    (2, "batch 2, lr 1", {"batch_size": 2, "lr": 1.0}),
  ],
}  # fmt: skip

#: Families that need class labels (not run on the regression task).
CLASS_ONLY = frozenset({"label_noise", "label_shift", "class_imbalance", "loss_output_mismatch"})

_HIGH_LR = (
  "divergence", "instability", "oscillation", "exploding_gradients", "update_ratio_high",
  "lr_above_curvature_limit",
)  # fmt: skip
#: What names the cause: ``family -> finding names`` that count as the right diagnosis.
#: ``lr_too_low``, ``bad_init_scale``, ``label_noise`` and ``dropout_too_strong`` are the
#: names of rules being written (issue 21); until they exist they simply never match.
ACCEPTABLE: dict[str, tuple[str, ...]] = {
  "lr_too_high": _HIGH_LR,
  "lr_too_low": (
    "lr_too_low", "early_plateau", "late_plateau", "update_ratio_low", "stalled_layers",
    "too_few_steps",
  ),
  "nan_data": ("nonfinite_data", "divergence"),
  "label_noise": ("label_noise", "late_plateau", "overfitting"),
  "label_shift": ("label_noise", "overfitting"),
  "class_imbalance": ("class_imbalance",),
  "unnormalised_inputs": ("unnormalised_inputs", *_HIGH_LR),
  "bad_init_scale": (
    "bad_init_scale", "exploding_gradients", "vanishing_gradients", "dead_units", "saturation",
    "divergence", "instability", "update_ratio_high", "update_ratio_low",
  ),
  "exploding_gradients": (
    "exploding_gradients", "bad_init_scale", "divergence", "instability", "update_ratio_high",
    "dead_units",
  ),
  "vanishing_gradients": (
    "vanishing_gradients", "bad_init_scale", "stalled_layers", "update_ratio_low",
  ),
  "saturated_activations": ("saturation", "bad_init_scale", "vanishing_gradients"),
  "dead_relu": (
    "dead_units", "stalled_layers", "vanishing_gradients", "update_ratio_low", "early_plateau",
  ),
  "frozen_layers": ("stalled_layers", "update_ratio_low", "vanishing_gradients"),
  "dropout_too_strong": ("dropout_too_strong",),
  "loss_output_mismatch": (
    "loss_output_mismatch", "early_plateau", "late_plateau", "update_ratio_low",
    "vanishing_gradients", "saturation", "too_few_steps",
  ),
  "too_few_steps": ("too_few_steps", "late_plateau"),
  "small_batch_high_lr": _HIGH_LR,
}  # fmt: skip


def stress(task: Task) -> dict[str, tuple[str, dict[str, Any]]]:
  """The healthy stress pool of ``task``: unusual but sound settings."""
  return {
    "full_batch": (f"full batch ({task.n_train}), lr {task.lr:g}", {"batch_size": task.n_train}),
    "small_batch": (
      "batch 16, 4 x the steps (the same examples)",
      {"batch_size": 16, "steps_frac": 4.0},
    ),
    "heavy_weight_decay": (
      "adamw lr 3e-3, weight decay 1.0",
      {"optimizer": "adamw", "lr": 3e-3, "optimizer_args": {"weight_decay": 1.0}},
    ),
  }


#: ``--quick``: the tasks, the fault settings ``(family, severity)`` and the stress setting.
QUICK = {
  "tasks": ("moons", "sine"),
  "faults": (("moons", "nan_data", 2), ("sine", "lr_too_high", 2)),
  "stress": (),
}


def grid(quick: bool = False, tasks: tuple[str, ...] | None = None) -> list[Variant]:
  """The variants of the grid (``quick``: :data:`QUICK`) on ``tasks`` (default: all)."""
  names = tasks or (QUICK["tasks"] if quick else tuple(TASKS))
  unknown = set(names) - set(TASKS)
  if unknown:
    raise ValueError(f"grid: tasks must be among {sorted(TASKS)}, got {sorted(unknown)}.")
  out = []
  for name in names:
    task = TASKS[name]
    out.append(Variant(name, "healthy", "healthy", 0, f"momentum lr {task.lr:g}, batch 64", {}))
    for key, (setting, fields) in stress(task).items():
      if not quick or (name, key) in QUICK["stress"]:
        out.append(Variant(name, "stress", key, 0, setting, fields))
    for family, levels in FAULTS.items():
      if family in CLASS_ONLY and not task.classification:
        continue
      for severity, setting, fields in levels:
        if not quick or (name, family, severity) in QUICK["faults"]:
          out.append(Variant(name, "fault", family, severity, setting, fields))
  return out


def make_jobs(
  variants: list[Variant], seeds: dict[str, int], runs_dir: Path, steps: dict[str, int]
) -> list[dict[str, Any]]:
  """One job per variant and seed. ``seeds``: per half ``"calibration"`` / ``"held_out"``
  the seeds of a fault or stress setting, and under ``"healthy_<half>"`` those of the
  healthy pool; ``steps``: the steps per task."""
  jobs = []
  for v in variants:
    half = TASKS[v.task].half
    n = seeds[f"healthy_{half}"] if v.pool == "healthy" else seeds[half]
    for seed in range(n):
      name = f"{v.task}/{v.family}-s{v.severity}-seed{seed}"
      jobs.append({
        "id": name, "task": v.task, "half": half, "pool": v.pool, "family": v.family,
        "severity": v.severity, "setting": v.setting, "fields": v.fields, "seed": seed,
        "task_steps": steps[v.task], "run_dir": str(runs_dir / name),
      })  # fmt: skip
  return jobs


def build_config(job: dict[str, Any], **overrides: Any) -> Any:
  """The :class:`~jaxscope.run.TrainConfig` of a job (``fields`` over :data:`BASE` and the
  task's lr; ``overrides`` last)."""
  from jaxscope.run import TrainConfig

  fields = dict(job["fields"])
  steps = max(4, round(job["task_steps"] * fields.pop("steps_frac", 1.0)))
  data_args = {"task": job["task"], "seed": job["seed"], **fields.pop("data_args", {})}
  model_args = dict(fields.pop("model_args", {}))
  kwargs = {
    "model": MODEL, "dataset": DATA, "steps": steps, "seed": job["seed"],
    "metrics": "economy", "eval_every": max(1, steps // 10), "checkpoint_every": 0,
    "live_diagnosis": False, "out": job["run_dir"], "quiet": True, "overwrite": True,
    "data_args": data_args, "model_args": model_args,
    **BASE, "lr": TASKS[job["task"]].lr, **fields, **overrides,
  }  # fmt: skip
  return TrainConfig(**kwargs)


def train_one(job: dict[str, Any]) -> dict[str, Any]:
  """Trains one run (in a worker process) and returns its row (outcome, no diagnosis).

  ``job["overrides"]`` (optional): TrainConfig fields set last (the reruns' ``stop_on``)."""
  from jaxscope.train import train

  config = build_config(job, **job.get("overrides", {}))
  t0 = time.perf_counter()
  result = train(config)
  ev = result.final_eval
  keep = ("id", "task", "half", "pool", "family", "severity", "setting", "fields", "seed",
          "task_steps", "run_dir")  # fmt: skip
  return {
    **{k: job[k] for k in keep},
    "steps": int(result.steps),
    "test_loss": _finite_or_none(ev.get("test/loss")),
    "test_accuracy": _finite_or_none(ev.get("test/accuracy")),
    "loss_events": loss_events(job["run_dir"]),
    "stopped": result.diverged,
    "train_seconds": round(time.perf_counter() - t0, 2),
  }


def _finite_or_none(x: Any) -> float | None:
  return float(x) if x is not None and math.isfinite(float(x)) else None


def records(run_dir: str | Path) -> list[tuple[int, dict[str, Any]]]:
  """``(step, values)`` of every line of a run's ``metrics.jsonl``."""
  from jaxscope.record.jsonio import loads

  out = []
  with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        obj = loads(line)
        out.append((int(obj["step"]), obj["values"]))
  return out


def loss_events(run_dir: str | Path) -> dict[str, int | None]:
  """The training loss's first non-finite step and its first step above
  :data:`DIVERGENCE_FACTOR` × the first finite loss (``None``: none), from the log."""
  first, nonfinite, explode = None, None, None
  for step, values in records(run_dir):
    if "loss" not in values:
      continue
    loss = float(values["loss"])
    if not math.isfinite(loss):
      nonfinite = step if nonfinite is None else nonfinite
      break
    if first is None:
      first = loss
    elif explode is None and first > 0 and loss > DIVERGENCE_FACTOR * first:
      explode = step
  return {"first_nonfinite_step": nonfinite, "first_explosion_step": explode}
