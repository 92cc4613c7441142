"""Ratio-adaptive learning rate vs constant and exponentially decaying rates (issue #4).

The experiment of the ikkuna thesis (L. Berg, "Live introspection of neural network
training", Osnabrück 2019, §4.2): train ikkuna's ``AlexNetMini`` on CIFAR-10 with plain SGD
(no momentum) at base learning rates {0.05, 0.1, 0.2, 0.5} under three schedules, five runs
each:

* ``constant``: the base rate throughout;
* ``exponential``: the base rate times ``0.98^epoch`` (staircase, per epoch);
* ``ratio``: the rate steered so that the mean update/weight ratio
  ``‖ΔW‖ / ‖W + ΔW‖`` over the weight layers sits at ``1e-3``
  (:func:`jaxscope.transforms.ratio_adaptive_sgd`, ``mode="code"``: the original
  implementation, the base rate scaled by ``target / EMA(mean ratio)`` with one step of lag).

The thesis reports that at too high base rates (and small batches) the ratio-adaptive rate
beats the constant one, and that at 0.2 exponential decay was slightly better than the
ratio-adaptive rate but with more variance; both beat the constant rate. Two further
schedules can be added (``--schedules``): ``ratio_thesis`` (``mode="thesis"``, eq. 3.7: a
multiplicative update that converges to the rate hitting the target, whatever the base rate)
and ``fixed_ratio`` (``FixedRatioSGD``: every tensor's step rescaled to ratio ``1e-3``
exactly, :func:`jaxscope.transforms.scale_to_update_ratio`; the base rate does not matter).

CIFAR-10 is not shipped, so the default run uses the embedded sets, ``alexnet_mini`` and
``lenet5`` on ``digits`` (8×8 images) and ``mnist1d`` (length-40 signals); the thesis's own
setting is the same loop with ``--data-dir DIR --datasets cifar10 --models alexnet_mini
--epochs 100 --batch-size 128``.

How it runs: for each (dataset, model, schedule) one program is compiled that trains all
(base rate, seed) runs at once. The base rate is a traced argument (the optimizer is built
inside the traced function), a step is a ``lax.scan`` iteration over batches gathered from
the training set on the device with a per-run, per-epoch permutation, and the test accuracy
is evaluated exactly on the whole test split after every epoch. Runs are spread over the
devices with ``shard_map``; on each device they are either vectorised with ``vmap`` (the
default on accelerators) or run one after the other with ``lax.map`` (the default on CPU,
where XLA turns per-run convolution kernels into grouped convolutions that are slower than
running the runs in turn). On CPU the script asks XLA for one host device per core (before
JAX is imported), so the runs are trained in parallel on all cores.

Every schedule records, per step, the effective learning rate ``‖Δ‖ / ‖g‖`` (global norms of
the applied update and of the gradient: exactly the rate for SGD-type steps, and a
norm-weighted rate for ``fixed_ratio``) and the mean update/weight ratio. The ratio-adaptive
schedules report their own mean ratio (:func:`jaxscope.transforms.ratio_lr_values`); the
others get a *recorder* chained at the end, ``ratio_adaptive_lr(max_factor=1.0, floor=1.0)``:
with its factor clipped to ``[1, 1]`` it never changes an update and only keeps the ratios,
smoothed exactly like those of ``ratio`` (EMA with weight 0.9 on the newest ratio).

Run it with::

    python examples/ratio_lr_schedules.py            # the default run (10–15 min, 2 cores)
    python examples/ratio_lr_schedules.py --quick    # a smoke test (seconds)

It writes ``OUT/results/ratio_lr_schedules.json`` and ``OUT/figures/ratio_lr_{boxplots,
traces,curves}.png`` (``--out``, default ``docs/``) and prints the table of final test
accuracies.
"""

from __future__ import annotations

import os
import sys

# One XLA host device per core, so that runs can be sharded over the cores on CPU. This
# must happen before JAX is imported; it changes nothing on accelerators.
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
  ).strip()
# The smoke test (--quick) spends most of its time compiling. XLA:CPU without LLVM
# optimisation and with its classic instead of its MLIR fusion emitters compiles two to
# three times as fast, which outweighs its slower steps.
if "--quick" in sys.argv[1:] and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  ).strip()

import argparse
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.figure import Figure

import jaxscope
from jaxscope import data, models, record
from jaxscope.transforms import (
  ratio_adaptive_lr,
  ratio_adaptive_sgd,
  ratio_lr_values,
  scale_to_update_ratio,
)

SCHEDULES: dict[str, str] = {
  "constant": "SGD at the base rate",
  "exponential": "SGD, base rate × 0.98^epoch (staircase)",
  "ratio": "ratio-adaptive SGD, mode 'code' (the original implementation)",
  "ratio_thesis": "ratio-adaptive SGD, mode 'thesis' (eq. 3.7)",
  "fixed_ratio": "FixedRatioSGD: every tensor's step rescaled to the target ratio",
}
DEFAULT_SCHEDULES = ("constant", "exponential", "ratio", "ratio_thesis", "fixed_ratio")
DEFAULT_MODELS = ("alexnet_mini", "lenet5")
DEFAULT_DATASETS = ("digits", "mnist1d")
DEFAULT_LRS = (0.05, 0.1, 0.2, 0.5)
#: Epochs per dataset when --epochs is not given (digits: 22 steps per epoch at batch size
#: 64, mnist1d: 62); other datasets get the thesis's 100.
DEFAULT_EPOCHS: dict[str, int] = {"digits": 60, "mnist1d": 40}
THESIS_EPOCHS = 100
QUICK = {
  "models": ["mlp"],  # the smoke test: a model that compiles in a fraction of LeNet-5's time
  "datasets": ["digits"],
  "lrs": [0.1, 0.5],
  "seeds": 2,
  "epochs": 2,
}
DECAY_RATE = 0.98
EVAL_CHUNK = 1000
COLORS = {
  "constant": "tab:blue",
  "exponential": "tab:orange",
  "ratio": "tab:green",
  "ratio_thesis": "tab:red",
  "fixed_ratio": "tab:purple",
}


def make_optimizer(
  schedule: str, lr: jax.Array | float, steps_per_epoch: int, target: float
) -> optax.GradientTransformation:
  """The optimizer of ``schedule`` at base rate ``lr`` (a traced array is fine).

  Every optimizer holds exactly one ratio state, so ``ratio_lr_values`` reads the mean
  update/weight ratio of any of them: the ratio-adaptive ones hold their own; the others end
  with ``ratio_adaptive_lr(max_factor=1.0, floor=1.0)``, whose factor is clipped to 1 so that
  it only records the ratios.
  """
  recorder = ratio_adaptive_lr(target, max_factor=1.0, floor=1.0)
  if schedule == "constant":
    return optax.chain(optax.sgd(lr), recorder)
  if schedule == "exponential":
    decay = optax.exponential_decay(
      lr, transition_steps=steps_per_epoch, decay_rate=DECAY_RATE, staircase=True
    )
    return optax.chain(optax.sgd(decay), recorder)
  if schedule == "ratio":
    return ratio_adaptive_sgd(lr, target, mode="code")
  if schedule == "ratio_thesis":
    return ratio_adaptive_sgd(lr, target, mode="thesis")
  if schedule == "fixed_ratio":
    return optax.chain(optax.sgd(lr), scale_to_update_ratio(target), recorder)
  raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


class Grid:
  """Trains all (base rate, seed) runs of one model, dataset and schedule together.

  The runs form the leading axis of every array: they are sharded over ``devices`` and, on
  each device, vectorised (``batching="vmap"``) or run in turn (``batching="map"``).
  """

  def __init__(
    self,
    model: models.ModelDef,
    schedule: str,
    *,
    n_train: int,
    batch_size: int,
    target: float,
    batching: str,
    devices: Sequence[jax.Device],
  ) -> None:
    self.model = model
    self.steps_per_epoch = n_train // batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"batch size {batch_size} exceeds the {n_train} training examples")
    self.mesh = Mesh(np.asarray(devices), ("runs",))
    self.ndev = len(devices)
    spe = self.steps_per_epoch

    def tx_of(lr: jax.Array) -> optax.GradientTransformation:
      return make_optimizer(schedule, lr, spe, target)

    def loss_fn(params: Any, x: jax.Array, y: jax.Array, rng: jax.Array) -> jax.Array:
      out, _ = model.apply({"params": params}, x, train=True, rng=rng)
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    def accuracy(params: Any, test: tuple[jax.Array, ...]) -> jax.Array:
      def chunk(correct: jax.Array, batch: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        x, y, mask = batch
        out, _ = model.apply({"params": params}, x, train=False)
        return correct + jnp.sum((jnp.argmax(out, -1) == y) & mask), None

      x, y, mask = test
      correct, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.int32), (x, y, mask))
      return correct / jnp.sum(mask)

    def epoch_run(
      params: Any,
      opt_state: Any,
      lr: jax.Array,
      key: jax.Array,
      epoch: jax.Array,
      train: tuple[jax.Array, jax.Array],
      test: tuple[jax.Array, ...],
    ) -> tuple[Any, Any, jax.Array, jax.Array]:
      x_tr, y_tr = train
      tx = tx_of(lr)
      order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1), epoch), n_train)
      batches = order[: spe * batch_size].reshape(spe, batch_size)
      dropout = jax.random.fold_in(jax.random.fold_in(key, 2), epoch)

      def step(carry: tuple[Any, Any], inp: tuple[jax.Array, jax.Array]) -> tuple[Any, jax.Array]:
        p, s = carry
        i, idx = inp
        rng = jax.random.fold_in(dropout, i)
        loss, g = jax.value_and_grad(loss_fn)(p, x_tr[idx], y_tr[idx], rng)
        u, s = tx.update(g, s, p)
        gnorm = optax.global_norm(g)
        lr_eff = optax.global_norm(u) / jnp.where(gnorm > 0, gnorm, jnp.nan)
        ratio = ratio_lr_values(s)["ratio_lr/mean_ratio"]
        return (optax.apply_updates(p, u), s), jnp.stack([loss, lr_eff, ratio])

      (params, opt_state), trace = jax.lax.scan(
        step, (params, opt_state), (jnp.arange(spe), batches)
      )
      return params, opt_state, trace, accuracy(params, test)

    if batching == "vmap":
      epoch_local = jax.vmap(epoch_run, in_axes=(0, 0, 0, 0, None, None, None))
    elif batching == "map":

      def epoch_local(
        params: Any,
        opt_state: Any,
        lrs: jax.Array,
        keys: jax.Array,
        epoch: jax.Array,
        train: tuple,
        test: tuple,
      ) -> tuple[Any, Any, jax.Array, jax.Array]:
        return jax.lax.map(
          lambda a: epoch_run(*a, epoch, train, test), (params, opt_state, lrs, keys)
        )
    else:
      raise ValueError(f"batching must be 'vmap' or 'map', got {batching!r}")

    runs, rep = P("runs"), P()
    if self.ndev > 1:
      epoch_local = jax.shard_map(
        epoch_local,
        mesh=self.mesh,
        in_specs=(runs, runs, runs, runs, rep, rep, rep),
        out_specs=runs,
        check_vma=False,
      )
    # The optimizer states are elementwise in the parameters: vmap is cheap to compile.
    self._init_opt = jax.jit(jax.vmap(lambda p, lr: tx_of(lr).init(p)))
    self._epoch = jax.jit(epoch_local, donate_argnums=(0, 1))

  def shard(self, x: Any, spec: P) -> Any:
    """Places ``x`` on the devices, split along the runs axis or replicated."""
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def init(self, params: Any, lrs: np.ndarray, seeds: np.ndarray) -> tuple[Any, Any, Any, Any]:
    """The state of the runs: their parameters, optimizer states, base rates and keys."""
    lrs = jnp.asarray(lrs, jnp.float32)
    opt_state = self._init_opt(params, lrs)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    return self.shard((params, opt_state, lrs, keys), P("runs"))

  def epoch(
    self, state: tuple[Any, Any, Any, Any], epoch: int, train: tuple, test: tuple
  ) -> tuple[tuple[Any, Any, Any, Any], jax.Array, jax.Array]:
    """One epoch of every run: new state, ``[runs, steps, (loss, lr, ratio)]``, accuracies."""
    params, opt_state, lrs, keys = state
    params, opt_state, trace, acc = self._epoch(
      params, opt_state, lrs, keys, jnp.asarray(epoch, jnp.int32), train, test
    )
    return (params, opt_state, lrs, keys), trace, acc


def eval_chunks(x: np.ndarray, y: np.ndarray, chunk: int = EVAL_CHUNK) -> tuple[np.ndarray, ...]:
  """The test split as ``[chunks, chunk, ...]`` arrays plus a mask of the real examples."""
  n = len(x)
  chunk = min(chunk, n)
  k = -(-n // chunk)
  pad = k * chunk - n
  mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
  x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
  y = np.concatenate([y, np.zeros(pad, y.dtype)])
  return (
    x.reshape(k, chunk, *x.shape[1:]),
    y.reshape(k, chunk),
    mask.reshape(k, chunk),
  )


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(float(x)) else None


def _round(values: Any, digits: int = 4) -> list:
  """A JSON-safe list: floats to ``digits`` significant digits, NaN/Inf as ``None``."""
  out = []
  for v in np.asarray(values, np.float64).ravel():
    out.append(float(f"{v:.{digits}g}") if math.isfinite(v) else None)
  return out


def dumps(obj: Any) -> str:
  """JSON with one key per line but every list of numbers on a single line."""
  text = record.dumps(obj, indent=1)
  return re.sub(
    r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]",
    lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
    text,
  )


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
  with np.errstate(invalid="ignore"):
    finite = np.isfinite(a)
    count = finite.sum(axis)
    total = np.where(finite, a, 0.0).sum(axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def init_params(model: models.ModelDef, seeds: int, x0: np.ndarray) -> Any:
  """The parameters of seeds ``0..seeds-1`` (from ``jax.random.key(seed)``), stacked.

  Shared by every base rate and schedule, so runs with the same seed start from the same
  weights (and, with the same seed, see the same batches and dropout masks).
  """
  keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
  return jax.jit(jax.vmap(lambda k: model.init(k, x0)["params"]))(keys)


def run_grid(
  ds: data.Dataset,
  model: models.ModelDef,
  params: Any,
  schedule: str,
  *,
  lrs: Sequence[float],
  seeds: int,
  epochs: int,
  batch_size: int,
  target: float,
  batching: str,
  devices: Sequence[jax.Device],
  trace_lr: float | None,
  trace_seed: int,
) -> dict[str, Any]:
  """Trains the (lr, seed) grid of one model, dataset and schedule; returns its results."""
  t0 = time.perf_counter()
  grid = Grid(
    model,
    schedule,
    n_train=len(ds.train_x),
    batch_size=batch_size,
    target=target,
    batching=batching,
    devices=devices,
  )
  run_lr = np.repeat(np.asarray(lrs, np.float32), seeds)
  run_seed = np.tile(np.arange(seeds), len(lrs))
  n_runs = len(run_lr)
  pad = -n_runs % grid.ndev  # padding runs (copies of run 0) so every device gets as many
  run_lr_p = np.concatenate([run_lr, np.repeat(run_lr[:1], pad)])
  run_seed_p = np.concatenate([run_seed, np.repeat(run_seed[:1], pad)])

  train = (grid.shard(jnp.asarray(ds.train_x), P()), grid.shard(jnp.asarray(ds.train_y), P()))
  test = tuple(grid.shard(jnp.asarray(a), P()) for a in eval_chunks(ds.test_x, ds.test_y))
  run_params = jax.tree.map(lambda a: a[run_seed_p], params)
  state = grid.init(run_params, run_lr_p, run_seed_p)
  accs, traces = [], []
  for epoch in range(epochs):
    state, trace, acc = grid.epoch(state, epoch, train, test)
    accs.append(acc)
    traces.append(trace)
  accs = np.asarray(jax.device_get(accs), np.float64).T[:n_runs]  # [runs, epochs]
  trace = np.concatenate(jax.device_get(traces), axis=1)[:n_runs].astype(np.float64)
  elapsed = time.perf_counter() - t0
  spe = grid.steps_per_epoch
  per_epoch = trace.reshape(n_runs, epochs, spe, 3)

  result: dict[str, Any] = {"wall_s": round(elapsed, 2), "by_lr": {}}
  for lr in lrs:
    sel = np.flatnonzero(np.isclose(run_lr, lr))
    final = accs[sel, -1]
    losses = per_epoch[sel, :, :, 0]
    result["by_lr"][f"{lr:g}"] = {
      "final_test_accuracy": _round(final, 6),
      "mean": _finite_or_none(final.mean()),
      "std": _finite_or_none(final.std(ddof=1)) if len(final) > 1 else 0.0,
      "diverged": int(np.sum(~np.isfinite(losses[:, -1, -1]))),
      "curves": {
        "test_accuracy": _round(accs[sel].mean(0)),
        "train_loss": _round(_nanmean(_nanmean(losses, 2), 0)),
        "lr": _round(_nanmean(_nanmean(per_epoch[sel, :, :, 1], 2), 0)),
        "mean_ratio": _round(_nanmean(_nanmean(per_epoch[sel, :, :, 2], 2), 0)),
      },
    }
  if trace_lr is not None:
    sel = np.flatnonzero(np.isclose(run_lr, trace_lr) & (run_seed == trace_seed))
    if sel.size:
      run = trace[sel[0]]
      result["trace"] = {"lr": _round(run[:, 1]), "mean_ratio": _round(run[:, 2])}
  return result


def markdown_table(results: dict[str, Any], schedules: Sequence[str]) -> str:
  """Final test accuracy (%) mean ± std per model/dataset/lr (rows) and schedule (columns).

  The best mean of each row is bold; ``(k div.)`` counts runs whose loss ended non-finite.
  """
  lines = [
    "| model | dataset | lr | " + " | ".join(schedules) + " |",
    "|---|---|---:|" + "---:|" * len(schedules),
  ]
  for model_name, by_ds in results.items():
    for ds_name, by_sched in by_ds.items():
      lrs = list(next(iter(by_sched.values()))["by_lr"])
      for lr in lrs:
        cells = [by_sched[s]["by_lr"][lr] for s in schedules]
        means = [c["mean"] if c["mean"] is not None else -1.0 for c in cells]
        best = max(means)
        row = []
        for c, m in zip(cells, means, strict=True):
          text = f"{100 * m:.1f} ± {100 * c['std']:.1f}" if c["mean"] is not None else "n/a"
          if m == best:
            text = f"**{text}**"
          if c["diverged"]:
            text += f" ({c['diverged']} div.)"
          row.append(text)
        lines.append(f"| {model_name} | {ds_name} | {lr} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def paired_table(results: dict[str, Any], schedules: Sequence[str], ref: str = "constant") -> str:
  """Mean over seeds of (schedule − ``ref``) final accuracy in points, paired by seed.

  Runs with the same seed share initialisation, data order and dropout masks, so the paired
  difference removes most of the seed-to-seed spread. ``k/n`` counts the seeds where the
  schedule was better.
  """
  others = [s for s in schedules if s != ref]
  if ref not in schedules or not others:
    return ""
  lines = [
    "| model | dataset | lr | " + " | ".join(f"{s} − {ref}" for s in others) + " |",
    "|---|---|---:|" + "---:|" * len(others),
  ]
  for model_name, by_ds in results.items():
    for ds_name, by_sched in by_ds.items():
      for lr in by_sched[ref]["by_lr"]:
        base = np.asarray(_none_to_nan(by_sched[ref]["by_lr"][lr]["final_test_accuracy"]))
        row = []
        for s in others:
          acc = np.asarray(_none_to_nan(by_sched[s]["by_lr"][lr]["final_test_accuracy"]))
          diff = 100 * (acc - base)
          row.append(f"{np.mean(diff):+.1f} ({int(np.sum(diff > 0))}/{len(diff)})")
        lines.append(f"| {model_name} | {ds_name} | {lr} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def _none_to_nan(values: Sequence[float | None]) -> list[float]:
  return [np.nan if v is None else v for v in values]


def _panels(results: dict[str, Any]) -> list[tuple[str, str]]:
  return [(m, d) for m, by_ds in results.items() for d in by_ds]


def boxplot_figure(results: dict[str, Any], schedules: Sequence[str], chance: dict) -> Figure:
  """Final test accuracy per seed: one panel per model × dataset, x = lr, boxes by schedule."""
  panels = _panels(results)
  ncols = min(2, len(panels))
  nrows = -(-len(panels) // ncols)
  fig = Figure(figsize=(6.5 * ncols, 4.0 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  width = 0.8 / len(schedules)
  for ax, (m, d) in zip(axes, panels, strict=False):
    by_sched = results[m][d]
    lrs = list(by_sched[schedules[0]]["by_lr"])
    for j, s in enumerate(schedules):
      vals = [
        [v for v in by_sched[s]["by_lr"][lr]["final_test_accuracy"] if v is not None] for lr in lrs
      ]
      pos = np.arange(len(lrs)) - 0.4 + width * (j + 0.5)
      bp = ax.boxplot(
        vals,
        positions=pos,
        widths=width * 0.85,
        patch_artist=True,
        manage_ticks=False,
        medianprops={"color": "black"},
        flierprops={"markersize": 3},
      )
      for box in bp["boxes"]:
        box.set_facecolor(COLORS.get(s, "grey"))
        box.set_alpha(0.75)
      ax.plot([], [], "s", color=COLORS.get(s, "grey"), label=s)
    ax.axhline(chance[d], color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(np.arange(len(lrs)), lrs)
    ax.set_xlabel("base learning rate")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{m} on {d}")
    ax.grid(axis="y", alpha=0.3)
  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  axes[0].legend(fontsize=8, loc="lower left")
  return fig


def curves_figure(results: dict[str, Any], schedules: Sequence[str]) -> Figure:
  """Mean test accuracy vs epoch: rows model × dataset, columns lr, lines schedules."""
  panels = _panels(results)
  lrs = list(results[panels[0][0]][panels[0][1]][schedules[0]]["by_lr"])
  fig = Figure(figsize=(3.2 * len(lrs), 2.6 * len(panels)), layout="constrained")
  axes = fig.subplots(len(panels), len(lrs), squeeze=False, sharey="row")
  for i, (m, d) in enumerate(panels):
    for j, lr in enumerate(lrs):
      ax = axes[i, j]
      for s in schedules:
        curve = _none_to_nan(results[m][d][s]["by_lr"][lr]["curves"]["test_accuracy"])
        ax.plot(np.arange(1, len(curve) + 1), curve, color=COLORS.get(s), label=s, lw=1.2)
      ax.set_title(f"{m} / {d} / lr {lr}", fontsize=9)
      ax.grid(alpha=0.3)
      if i == len(panels) - 1:
        ax.set_xlabel("epoch")
      if j == 0:
        ax.set_ylabel("test accuracy")
  axes[0, 0].legend(fontsize=7)
  return fig


def traces_figure(traces: dict[str, Any], results: dict[str, Any], target: float) -> Figure:
  """Effective lr and mean update/weight ratio per step of one run, all schedules.

  Panels: (a) the effective rate, (b) the mean ratio with the target, (c) the first 60 steps
  of the effective rate, (d) the per-epoch mean effective rate of the ratio-adaptive
  schedules at every base rate (mean over seeds) for the same model and dataset.
  """
  fig = Figure(figsize=(13, 8), layout="constrained")
  (a, b), (c, d) = fig.subplots(2, 2)
  m, ds, lr, seed = traces["model"], traces["dataset"], traces["lr"], traces["seed"]
  for s, tr in traces["schedules"].items():
    lr_t, ratio_t = np.asarray(_none_to_nan(tr["lr"])), np.asarray(_none_to_nan(tr["mean_ratio"]))
    steps = np.arange(len(lr_t))
    kw = {"color": COLORS.get(s), "label": s, "lw": 0.8}
    a.plot(steps, lr_t, **kw)
    b.plot(steps, ratio_t, **kw)
    c.plot(steps[:60], lr_t[:60], marker=".", ms=3, **kw)
  b.axhline(target, color="black", ls="--", lw=1, label=f"target {target:g}")
  for ax, title in (
    (a, "(a) effective learning rate ‖Δ‖/‖g‖"),
    (b, "(b) mean update/weight ratio, smoothed (weight 0.9 on the newest)"),
    (c, "(c) effective learning rate, first 60 steps"),
  ):
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
  a.legend(fontsize=8)
  b.legend(fontsize=8)
  by_sched = results[m][ds]
  styles = {"ratio": "-", "ratio_thesis": "--"}
  shown = [s for s in styles if s in by_sched]
  cmap = {lr_: f"C{i}" for i, lr_ in enumerate(next(iter(by_sched.values()))["by_lr"])}
  for s in shown:
    for lr_, res in by_sched[s]["by_lr"].items():
      curve = np.asarray(_none_to_nan(res["curves"]["lr"]))
      d.plot(
        np.arange(1, len(curve) + 1),
        curve,
        ls=styles[s],
        color=cmap[lr_],
        label=f"{s}, base {lr_}",
      )
  d.set_yscale("log")
  d.set_xlabel("epoch")
  d.set_title("(d) ratio-adaptive rates per epoch (mean over steps and seeds)", fontsize=10)
  d.grid(alpha=0.3, which="both")
  if shown:
    d.legend(fontsize=7, ncols=2)
  fig.suptitle(f"{m} on {ds}, base lr {lr:g}, seed {seed} (panels a–c)")
  return fig


def _loadavg() -> float:
  """The 1-minute load average (NaN where the platform has none): other work on the CPU."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):
    return float("nan")


def _default_trace(models_: Sequence[str], datasets_: Sequence[str]) -> tuple[str, str]:
  m = "lenet5" if "lenet5" in models_ else models_[0]
  d = "digits" if "digits" in datasets_ else datasets_[0]
  return m, d


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--models", nargs="+", help=f"default {' '.join(DEFAULT_MODELS)}")
  parser.add_argument("--datasets", nargs="+", help=f"default {' '.join(DEFAULT_DATASETS)}")
  parser.add_argument("--data-dir", help="directory of file-based datasets (cifar10, mnist, …)")
  parser.add_argument("--lrs", nargs="+", type=float, help="base learning rates")
  parser.add_argument(
    "--schedules",
    nargs="+",
    choices=sorted(SCHEDULES),
    help=f"default {' '.join(DEFAULT_SCHEDULES)}",
  )
  parser.add_argument("--seeds", type=int, help="runs per configuration (seeds 0..n-1); 5")
  parser.add_argument(
    "--epochs",
    type=int,
    help=f"epochs for every dataset (default per dataset: {DEFAULT_EPOCHS}, "
    f"others {THESIS_EPOCHS})",
  )
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--target", type=float, default=1e-3, help="target update/weight ratio")
  parser.add_argument(
    "--batching",
    choices=["auto", "vmap", "map"],
    default="auto",
    help="runs on one device: vectorised (vmap) or in turn (map); auto: map on CPU",
  )
  parser.add_argument(
    "--trace",
    help="MODEL/DATASET/LR/SEED of the run whose per-step trace is kept "
    "(default lenet5/digits/<largest lr>/0, or the first model and dataset)",
  )
  parser.add_argument("--out", default="docs", help="writes OUT/results and OUT/figures")
  parser.add_argument("--quick", action="store_true", help="a tiny smoke-test configuration")
  args = parser.parse_args(argv)
  defaults = {
    "models": list(DEFAULT_MODELS),
    "datasets": list(DEFAULT_DATASETS),
    "lrs": list(DEFAULT_LRS),
    "schedules": list(DEFAULT_SCHEDULES),
    "seeds": 5,
    "epochs": None,
  }
  if args.quick:
    defaults.update(QUICK)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.seeds < 1:
    parser.error("--seeds must be >= 1")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  t_start = time.perf_counter()
  load_start = round(_loadavg(), 2)
  devices = jax.devices()
  backend = jax.default_backend()
  batching = args.batching
  if batching == "auto":
    batching = "map" if backend == "cpu" else "vmap"
  epochs = {
    d: args.epochs or DEFAULT_EPOCHS.get(d.lower().replace("-", "_"), THESIS_EPOCHS)
    for d in args.datasets
  }
  if args.trace:
    tm, td, tlr, tseed = args.trace.split("/")
    trace_spec = (tm, td, float(tlr), int(tseed))
  else:
    tm, td = _default_trace(args.models, args.datasets)
    trace_spec = (tm, td, max(args.lrs), 0)
  print(
    f"models {args.models}, datasets {args.datasets}, lrs {args.lrs}, schedules "
    f"{args.schedules}, {args.seeds} seeds, batch size {args.batch_size}, epochs {epochs}"
  )
  print(f"backend {backend}: {len(devices)} device(s), runs batched by {batching}")

  results: dict[str, Any] = {m: {} for m in args.models}
  traces: dict[str, Any] = {
    "model": trace_spec[0],
    "dataset": trace_spec[1],
    "lr": trace_spec[2],
    "seed": trace_spec[3],
    "schedules": {},
  }
  chance, sizes = {}, {}
  for ds_name in args.datasets:
    ds = data.load(ds_name, args.data_dir)
    if ds.task != "classification":
      raise SystemExit(f"{ds_name} is a {ds.task} dataset; this experiment needs classification")
    chance[ds_name] = float(np.bincount(ds.test_y).max() / len(ds.test_y))
    sizes[ds_name] = {
      "train": len(ds.train_x),
      "test": len(ds.test_x),
      "input_shape": list(ds.train_x.shape[1:]),
      "steps_per_epoch": len(ds.train_x) // args.batch_size,
    }
    for m in args.models:
      results[m][ds_name] = {}
      model = models.build(m, ds.train_x.shape[1:], ds.num_classes)
      params = init_params(model, args.seeds, jnp.asarray(ds.train_x[:1]))
      for s in args.schedules:
        is_trace = (m, ds_name) == trace_spec[:2]
        res = run_grid(
          ds,
          model,
          params,
          s,
          lrs=args.lrs,
          seeds=args.seeds,
          epochs=epochs[ds_name],
          batch_size=args.batch_size,
          target=args.target,
          batching=batching,
          devices=devices,
          trace_lr=trace_spec[2] if is_trace else None,
          trace_seed=trace_spec[3],
        )
        if "trace" in res:
          traces["schedules"][s] = res.pop("trace")
        results[m][ds_name][s] = res
        accs = "  ".join(
          f"{lr}: {100 * r['mean']:.1f}" if r["mean"] is not None else f"{lr}: n/a"
          for lr, r in res["by_lr"].items()
        )
        print(f"{m:>12s} {ds_name:>8s} {s:>12s}  {res['wall_s']:6.1f} s  test acc % {accs}")

  wall = time.perf_counter() - t_start
  load_end = round(_loadavg(), 2)
  table = markdown_table(results, args.schedules)
  paired = paired_table(results, args.schedules)
  print(f"\nFinal test accuracy (%), mean ± std over {args.seeds} seeds:\n")
  print(table)
  if paired:
    print("\nPaired by seed, difference to constant (points; seeds better):\n")
    print(paired)

  out = Path(args.out)
  (out / "results").mkdir(parents=True, exist_ok=True)
  (out / "figures").mkdir(parents=True, exist_ok=True)
  report = {
    "config": {
      "command": " ".join(
        ["python examples/ratio_lr_schedules.py", *(argv if argv is not None else sys.argv[1:])]
      ),
      "models": args.models,
      "datasets": args.datasets,
      "dataset_sizes": sizes,
      "lrs": args.lrs,
      "schedules": {s: SCHEDULES[s] for s in args.schedules},
      "seeds": args.seeds,
      "epochs": epochs,
      "batch_size": args.batch_size,
      "target": args.target,
      "exponential_decay_rate": DECAY_RATE,
      "optimizer": "plain SGD (no momentum, no weight decay), softmax cross-entropy",
      "backend": backend,
      "devices": [str(d) for d in devices],
      "batching": batching,
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "wall_time_s": round(wall, 1),
      "load_average_1min_start_end": [_finite_or_none(x) for x in (load_start, load_end)],
      "jax": jax.__version__,
      "optax": optax.__version__,
      "jaxscope": jaxscope.__version__,
      "chance_accuracy": chance,
    },
    "results": results,
    "traces": traces,
  }
  json_path = out / "results" / "ratio_lr_schedules.json"
  json_path.write_text(dumps(report) + "\n")
  figures: list[tuple[str, Callable[[], Figure]]] = [
    ("ratio_lr_boxplots.png", lambda: boxplot_figure(results, args.schedules, chance)),
    ("ratio_lr_curves.png", lambda: curves_figure(results, args.schedules)),
  ]
  if traces["schedules"]:
    figures.append(("ratio_lr_traces.png", lambda: traces_figure(traces, results, args.target)))
  for name, make in figures:
    make().savefig(out / "figures" / name, dpi=80 if args.quick else 110)
  print(f"\nwrote {json_path} and {len(figures)} figures in {out / 'figures'}")
  print(f"wall time {wall:.1f} s")
  return report


if __name__ == "__main__":
  main()
