"""The probabilistic preconditioner against SGD and Adam (issue #5).

Reproduces, on the embedded data sets, experiments 1 and 4 of the probabilistic-
preconditioning thesis (L. Bald, Tübingen 2019, ``ludwigbald/probprec``), which
reimplemented the low-rank preconditioner of F. de Roos and P. Hennig, "Active probabilistic
inference on matrices for pre-conditioning in stochastic optimization" (AISTATS 2019) in
PyTorch and ran it on DeepOBS's ``fmnist_2c2d`` and ``cifar10_3c3d``:

* **Experiment 1**: training loss and test accuracy per epoch of SGD at a tuned learning
  rate, Adam (``1e-3``), PreconditionedSGD, AdaptiveSGD (the estimated step size ``α``, no
  preconditioning) and OnlyAdaptiveSGD (the prior phase only), all with the reference
  code's behaviour (``faithful=True``), plus extra curves: PreconditionedSGD with the
  consistent formulas and safeguards (``faithful=False``), and three runs re-estimated every
  epoch (the thesis's schedule): PreconditionedSGD, PreconditionedSGD at the tuned SGD rate
  (``fixed_lr``, the thesis's "tuned" variant) and OnlyAdaptiveSGD at the tuned rate, which
  is plain SGD that loses the 14 estimation steps of every epoch. The last two differ only
  by the preconditioning; the last and SGD only by the lost steps.
* **Experiment 4**: learning-rate sensitivity: the final test accuracy and training loss of
  PreconditionedSGD whose first cycle steps with a given ``initial_lr`` (later cycles use
  ``α``) and of SGD at the same rates, on a log grid.

Every variant of the preconditioner is :func:`jaxscope.transforms.probabilistic_preconditioner`
(``preconditioned_sgd``, ``adaptive_sgd``, ``only_adaptive_sgd``) with its defaults
``est_rank=2, num_observations=5, prior_iterations=10``: each estimation cycle spends
``P + M − 1 = 14`` minibatches, with the weights held still, on Hessian-vector products of
the same minibatch loss, then steps with ``−α·P g``. "SGD (tuned)" is SGD at the rate of the
grid (``--lrs``) with the lowest final training loss on seed 0. The step size ``α`` of every
cycle is recorded and compared with that rate.

The thesis re-estimated every epoch; DeepOBS's epochs have 390–470 steps at batch size
128, so the 14 estimation steps cost 3–4 % of them. On the embedded sets an epoch is 22
(digits, batch size 64) or 31 (mnist1d, batch size 128) steps, so re-estimating every
epoch would freeze 64 % or 45 % of the steps. By default the preconditioner is therefore
re-estimated every ``--reestimate-epochs 10`` epochs (220 or 310 steps, 6 % or 4.5 % of
them frozen, about as often per step as the thesis); the per-epoch schedule runs as the
extra curves ``*_per_epoch``.

The thesis's network is DeepOBS's ``2c2d`` (``jaxscope.models.build("2c2d", …)``). It runs on
both sets, but at 0.3–0.7 M parameters it costs about 20× LeNet-5 per step on a CPU, too much
for this grid in the time budget, so the default is ``lenet5``; ``--setups 2c2d/mnist1d``
(any ``MODEL/DATASET``) runs the same experiments with it.

How it runs: the initial weights and the data order come from the seed, so every method
starts from the same weights and sees the same batches. An epoch is one jitted program, a
``lax.scan`` over its steps with the data on the device and a per-epoch permutation. The
preconditioner's phase is a function of the step index
(:func:`~jaxscope.transforms.preconditioner_phase`), so its epoch is a chain of scans, one
per run of equal phases, each with a *static* ``phase=``: no ``lax.switch`` (XLA:CPU copies
every buffer a conditional passes through), and only the estimation steps build the
gradient and the Hessian-vector product of the same minibatch in one pass
(:func:`~jaxscope.transforms.value_grad_and_hvp`) for ``tx.update(…, hvp_fn=hvp,
phase=…)``; the other steps, and SGD and Adam, use ``jax.value_and_grad``. After every
epoch (and before the first) the loss and accuracy are evaluated exactly on the whole test
split and on a fixed training subset as large as the test split (DeepOBS's train-eval set):
"training loss" means the latter. The runs of one method share its compiled epochs (the
learning rate is a traced argument); runs are timed after ahead-of-time compilation, so
the per-step costs (which include the evaluation) are comparable.

Run it with::

    python examples/preconditioner_comparison.py            # the default run (~9 min on 2 cores)
    python examples/preconditioner_comparison.py --quick    # a smoke test (mlp, ~15 s)

It writes ``OUT/results/preconditioner_comparison.json`` and
``OUT/figures/probprec_{curves,sensitivity,alpha}.png`` (``--out``, default ``docs/``) and
prints the tables as markdown.
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
import math
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from matplotlib.figure import Figure

import jaxscope
from jaxscope import data, models, record
from jaxscope.transforms import (
  adaptive_sgd,
  only_adaptive_sgd,
  preconditioned_sgd,
  preconditioner_log,
  preconditioner_phase,
  value_grad_and_hvp,
)

matplotlib.use("Agg")  # The figures are drawn without pyplot; no display is needed.

#: The methods of experiment 1: label, and whether the optimizer needs Hessian-vector products.
METHODS: dict[str, str] = {
  "sgd": "SGD (tuned lr)",
  "adam": "Adam",
  "psgd": "PreconditionedSGD",
  "adaptive": "AdaptiveSGD",
  "only_adaptive": "OnlyAdaptiveSGD",
  "psgd_consistent": "PreconditionedSGD, faithful=False",
  "psgd_per_epoch": "PreconditionedSGD, re-estimated every epoch",
  "psgd_tuned_per_epoch": "PreconditionedSGD at the tuned lr, re-estimated every epoch",
  "sgd_frozen_per_epoch": "SGD at the tuned lr, 14 steps frozen every epoch",
}
PROBPREC = (
  "psgd",
  "adaptive",
  "only_adaptive",
  "psgd_consistent",
  "psgd_per_epoch",
  "psgd_tuned_per_epoch",
  "sgd_frozen_per_epoch",
)
#: Methods that take the tuned SGD learning rate (as ``fixed_lr`` for the preconditioner).
TUNED = ("sgd", "psgd_tuned_per_epoch", "sgd_frozen_per_epoch")
#: Re-estimated every epoch (the thesis's schedule) rather than every --reestimate-epochs.
PER_EPOCH = ("psgd_per_epoch", "psgd_tuned_per_epoch", "sgd_frozen_per_epoch")
DEFAULT_SETUPS = ("lenet5/digits", "lenet5/mnist1d")
#: Epochs per dataset when --epochs is not given.
DEFAULT_EPOCHS: dict[str, int] = {"digits": 40, "mnist1d": 30}
#: Batch size per dataset when --batch-size is not given (the thesis: 128).
DEFAULT_BATCH: dict[str, int] = {"digits": 64, "mnist1d": 128}
OTHER_EPOCHS, OTHER_BATCH = 20, 128
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
QUICK: dict[str, Any] = {
  "setups": ["mlp/digits"],  # a model whose Hessian-vector products compile fast
  "epochs": 2,
  "seeds": 1,
  "sens_seeds": 1,
  "lrs": [0.1, 0.3],
  "methods": ["sgd", "psgd"],
  "reestimate_epochs": 1,
}
COLORS = {
  "sgd": "tab:blue",
  "adam": "tab:orange",
  "psgd": "tab:green",
  "adaptive": "tab:red",
  "only_adaptive": "tab:purple",
  "psgd_consistent": "tab:olive",
  "psgd_per_epoch": "tab:cyan",
  "psgd_tuned_per_epoch": "tab:brown",
  "sgd_frozen_per_epoch": "tab:gray",
  "psgd_initial_lr": "tab:green",
}
#: Extra curves (not in the thesis's experiment 1) are dashed.
EXTRA = ("psgd_consistent", *PER_EPOCH)
#: Columns of the per-epoch evaluation.
EVAL = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


# --------------------------------------------------------------------------- training


def make_optimizer(
  variant: str,
  hp: jax.Array | float,
  *,
  reestimate_every: int | None,
  steps_per_epoch: int,
) -> optax.GradientTransformation:
  """The optimizer of ``variant``; ``hp`` is its learning rate where it takes one (traced).

  ``psgd_initial_lr`` is PreconditionedSGD whose first cycle steps with ``hp`` instead of
  ``α`` (experiment 4); ``psgd_tuned_per_epoch`` (the thesis's "tuned" variant) and
  ``sgd_frozen_per_epoch`` (OnlyAdaptiveSGD at a fixed rate: plain SGD that loses the
  estimation steps) always step with ``fixed_lr=hp``; the others ignore ``hp``.
  """
  if variant == "sgd":
    return optax.sgd(hp)
  if variant == "adam":
    return optax.adam(hp)
  every = reestimate_every
  if variant == "psgd":
    return preconditioned_sgd(reestimate_every=every, faithful=True)
  if variant == "psgd_consistent":
    return preconditioned_sgd(reestimate_every=every, faithful=False)
  if variant == "psgd_per_epoch":
    return preconditioned_sgd(reestimate_every=steps_per_epoch, faithful=True)
  if variant == "psgd_tuned_per_epoch":
    return preconditioned_sgd(reestimate_every=steps_per_epoch, fixed_lr=hp, faithful=True)
  if variant == "sgd_frozen_per_epoch":
    return only_adaptive_sgd(reestimate_every=steps_per_epoch, fixed_lr=hp, faithful=True)
  if variant == "psgd_initial_lr":
    return preconditioned_sgd(reestimate_every=every, initial_lr=hp, faithful=True)
  if variant == "adaptive":
    return adaptive_sgd(reestimate_every=every, faithful=True)
  if variant == "only_adaptive":
    return only_adaptive_sgd(reestimate_every=every, faithful=True)
  raise ValueError(f"unknown method {variant!r}")


def epoch_segments(
  first_step: int, steps: int, reestimate_every: int | None
) -> tuple[tuple[int, int], ...]:
  """The preconditioner's phases over the steps of an epoch as ``((phase, length), …)``.

  The phase of a step is a function of its index (:func:`preconditioner_phase`), so each
  run of equal phases is one ``lax.scan`` with a *static* phase: no ``lax.switch``, and the
  build and apply steps need no Hessian-vector product.
  """
  segments: list[list[int]] = []
  for c in range(first_step, first_step + steps):
    phase = preconditioner_phase(c, reestimate_every=reestimate_every)
    if segments and segments[-1][0] == phase:
      segments[-1][1] += 1
    else:
      segments.append([phase, 1])
  return tuple((p, n) for p, n in segments)


class Setup:
  """One model on one dataset: the data on the device and the compiled epochs of each method.

  An epoch is one jitted program (``lax.scan`` over its steps); for the preconditioner it
  is a chain of scans, one per run of equal phases (:func:`epoch_segments`), so there are
  two programs per method: an epoch that starts an estimation cycle and one that does not.
  """

  def __init__(
    self,
    model_name: str,
    ds: data.Dataset,
    *,
    batch_size: int,
    epochs: int,
    reestimate_epochs: int,
  ) -> None:
    self.name = f"{model_name}/{ds.name}"
    self.model = models.build(model_name, ds.train_x.shape[1:], ds.num_classes)
    n_train, n_test = len(ds.train_x), len(ds.test_x)
    self.n_train, self.n_test = n_train, n_test
    self.batch_size, self.epochs = batch_size, epochs
    self.steps_per_epoch = n_train // batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"{self.name}: batch size {batch_size} exceeds {n_train} examples")
    self.reestimate_every = (
      reestimate_epochs * self.steps_per_epoch if reestimate_epochs > 0 else None
    )
    # DeepOBS's train-eval set: a fixed training subset as large as the test split.
    sub = np.random.default_rng(0).permutation(n_train)[: min(n_test, n_train)]
    self.arrays = tuple(
      jnp.asarray(a)
      for a in (ds.train_x, ds.train_y, ds.train_x[sub], ds.train_y[sub], ds.test_x, ds.test_y)
    )
    self.chance = float(np.bincount(ds.test_y).max() / n_test)
    self.num_params = models.count_params(self._init(0))
    self._compiled: dict[tuple, Any] = {}
    self.compile_s: dict[str, float] = {}
    self._cache: dict[tuple[str, float, int], dict[str, Any]] = {}
    self._evaluate = jax.jit(self._evaluation)

  def _init(self, seed: int) -> Any:
    return self.model.init(jax.random.key(seed), self.arrays[0][:1])["params"]

  def _every(self, variant: str) -> int | None:
    return self.steps_per_epoch if variant in PER_EPOCH else self.reestimate_every

  def _tx(self, variant: str, hp: jax.Array | float) -> optax.GradientTransformation:
    return make_optimizer(
      variant, hp, reestimate_every=self.reestimate_every, steps_per_epoch=self.steps_per_epoch
    )

  def _loss(self, p: Any, x: jax.Array, y: jax.Array, rng: jax.Array) -> jax.Array:
    out, _ = self.model.apply({"params": p}, x, train=True, rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  def _evaluation(self, p: Any, arrays: tuple) -> jax.Array:
    """``[train-eval loss, train-eval accuracy, test loss, test accuracy]``."""
    out = []
    for x, y in (arrays[2:4], arrays[4:6]):
      logits, _ = self.model.apply({"params": p}, x, train=False)
      out.append(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
      out.append(jnp.mean(jnp.argmax(logits, -1) == y))
    return jnp.stack(out)

  def _epoch_program(self, variant: str, segments: tuple | None) -> Callable[..., Any]:
    """One epoch: ``(params, opt_state, hp, key, epoch, arrays) -> (params, opt_state,
    records [steps, 6], evaluation [4])``; ``segments`` is ``None`` for SGD and Adam.

    The records of a step: minibatch loss, ``α``, the learning rate in use, the phase
    code, and the smallest and largest singular value ``σ`` of the low-rank estimate
    over the leaves (NaN for SGD and Adam)."""
    spe, bs, n_train = self.steps_per_epoch, self.batch_size, self.n_train
    no_hvp_posterior = variant in ("only_adaptive", "sgd_frozen_per_epoch")

    def epoch(p: Any, s: Any, hp: jax.Array, key: jax.Array, e: jax.Array, arrays: tuple):
      x_tr, y_tr = arrays[:2]
      tx = self._tx(variant, hp)
      data_key, drop_key = jax.random.split(key)

      def step(carry: tuple, inp: tuple, phase: int | None) -> tuple:
        p, s = carry
        i, idx = inp
        x, y, rng = x_tr[idx], y_tr[idx], jax.random.fold_in(drop_key, i)
        if phase is None:
          loss, g = jax.value_and_grad(self._loss)(p, x, y, rng)
          u, s = tx.update(g, s, p)
          rec = [loss, jnp.nan, hp, -1, jnp.nan, jnp.nan]
        else:
          if phase < 2 or (phase == 2 and not no_hvp_posterior):
            loss, g, hvp = value_grad_and_hvp(self._loss, p, x, y, rng)
            u, s = tx.update(g, s, p, hvp_fn=hvp, phase=phase)
          else:  # build and apply steps (and OnlyAdaptiveSGD's posterior steps): no HVP
            loss, g = jax.value_and_grad(self._loss)(p, x, y, rng)
            u, s = tx.update(g, s, p, phase=phase)
          log = preconditioner_log(s)
          sig = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(s.sigma)])
          kept = sig > 0  # dropped (or, for OnlyAdaptiveSGD, never estimated) are 0
          any_kept = jnp.any(kept)
          sig_min = jnp.where(any_kept, jnp.min(jnp.where(kept, sig, jnp.inf)), jnp.nan)
          sig_max = jnp.where(any_kept, jnp.max(jnp.where(kept, sig, 0.0)), jnp.nan)
          rec = [
            loss,
            log["probprec/alpha/all"],
            log["lr"],
            log["probprec/phase"],
            sig_min,
            sig_max,
          ]
        rec = jnp.stack([jnp.asarray(r, jnp.float32) for r in rec])
        return (optax.apply_updates(p, u), s), rec

      order = jax.random.permutation(jax.random.fold_in(data_key, e), n_train)
      batches = order[: spe * bs].reshape(spe, bs)
      index = e * spe + jnp.arange(spe)
      carry, recs, pos = (p, s), [], 0
      for phase, n in segments or ((None, spe),):
        sl = slice(pos, pos + n)
        carry, r = jax.lax.scan(
          lambda c, inp, phase=phase: step(c, inp, phase), carry, (index[sl], batches[sl])
        )
        recs.append(r)
        pos += n
      return (*carry, jnp.concatenate(recs), self._evaluation(carry[0], arrays))

    return epoch

  def _segments(self, variant: str, e: int) -> tuple | None:
    if variant in ("sgd", "adam"):
      return None
    spe = self.steps_per_epoch
    return epoch_segments(e * spe, spe, self._every(variant))

  def compiled(self, variant: str, segments: tuple | None) -> Any:
    """The ahead-of-time compiled epoch of ``variant`` with these phase ``segments``."""
    key = (variant, segments)
    if key not in self._compiled:
      t0 = time.perf_counter()
      params = self._init(0)
      args = (
        params,
        self._tx(variant, 0.1).init(params),
        jnp.asarray(0.1, jnp.float32),
        jax.random.key(0),
        jnp.asarray(0, jnp.int32),
        self.arrays,
      )
      program = jax.jit(self._epoch_program(variant, segments), donate_argnums=(0, 1))
      self._compiled[key] = program.lower(*args).compile()
      self.compile_s[variant] = self.compile_s.get(variant, 0.0) + time.perf_counter() - t0
    return self._compiled[key]

  def run(self, variant: str, hp: float, seed: int) -> dict[str, Any]:
    """One training run (cached): evaluations ``[epochs + 1, 4]``, step records and time."""
    key = (variant, float(hp), int(seed))
    if key not in self._cache:
      programs = [self.compiled(variant, self._segments(variant, e)) for e in range(self.epochs)]
      params = self._init(seed)
      state = self._tx(variant, 0.1).init(params)
      run_key = jax.random.key(10_000 + seed)
      hp_arr = jnp.asarray(hp, jnp.float32)
      t0 = time.perf_counter()
      evals, recs = [self._evaluate(params, self.arrays)], []
      for e, program in enumerate(programs):
        params, state, rec, ev = program(
          params, state, hp_arr, run_key, jnp.asarray(e, jnp.int32), self.arrays
        )
        recs.append(rec)
        evals.append(ev)
      evals, recs = jax.device_get((evals, recs))
      self._cache[key] = {
        "evals": np.asarray(evals, np.float64),
        "records": np.concatenate(recs).astype(np.float64),
        "run_s": time.perf_counter() - t0,
      }
    return self._cache[key]


# --------------------------------------------------------------------------- summaries


def _round(values: Any, digits: int = 5) -> Any:
  """JSON-safe nested lists: floats to ``digits`` significant digits, NaN/Inf as ``None``."""
  arr = np.asarray(values, np.float64)
  if arr.ndim == 0:
    v = float(arr)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None
  return [_round(v, digits) for v in arr]


def _stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample std (ddof 1; 0 for one seed) over axis 0, ignoring non-finite values."""
  a = np.where(np.isfinite(values), values, np.nan)
  n = np.sum(np.isfinite(a), axis=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as wanted
    mean = np.nanmean(a, axis=0)
    std = np.nanstd(a, axis=0, ddof=1) if a.shape[0] > 1 else np.zeros_like(mean)
  return mean, np.where(n > 1, std, 0.0)


def alpha_cycles(records: np.ndarray, steps_per_epoch: int) -> list[dict[str, Any]]:
  """``α`` of every estimation cycle: the step (and epoch) where it was set and its value.

  ``α`` is set at the end of the prior phase (phase code 1, ``prior_end``); ``lr`` is the
  learning rate the cycle then steps with (``initial_lr`` in cycle 0 when given);
  ``sigma_min``/``sigma_max`` are the extreme singular values of the low-rank estimate
  over the leaves, from the build step (the preconditioner scales its directions by
  ``σ^{-1/2}``; ``σ = 1/α`` carries no curvature information).
  """
  phase, alpha, lr = records[:, 3], records[:, 1], records[:, 2]
  out = []
  for i in np.flatnonzero(phase == 1):
    built = np.flatnonzero(phase[i:] >= 3)
    j = i + built[0] if built.size else None
    out.append(
      {
        "step": int(i),
        "epoch": _round((i + 1) / steps_per_epoch, 4),
        "alpha": _round(alpha[i]),
        "lr": _round(lr[j] if j is not None else np.nan),
        "sigma_min": _round(records[j, 4] if j is not None else np.nan),
        "sigma_max": _round(records[j, 5] if j is not None else np.nan),
      }
    )
  return out


def summarize(setup: Setup, variant: str, hp: float, seeds: Sequence[int]) -> dict[str, Any]:
  """Per-seed curves, their mean/std, final values, ``α`` per cycle and timings of one method."""
  runs = [setup.run(variant, hp, s) for s in seeds]
  evals = np.stack([r["evals"] for r in runs])  # [seeds, epochs + 1, 4]
  spe = setup.steps_per_epoch
  batch = np.stack([r["records"][:, 0].reshape(setup.epochs, spe).mean(1) for r in runs])
  curves: dict[str, Any] = {}
  per_seed: dict[str, Any] = {}
  final: dict[str, Any] = {}
  for j, name in enumerate(EVAL):
    mean, std = _stats(evals[:, :, j])
    per_seed[name] = _round(evals[:, :, j])
    curves[name] = {"mean": _round(mean), "std": _round(std)}
    last = evals[:, -1, j]
    fm, fs = _stats(last[:, None])
    final[name] = {"values": _round(last), "mean": _round(fm[0]), "std": _round(fs[0])}
  per_seed["batch_loss"] = _round(batch)
  diverged = int(np.sum(~np.isfinite(evals[:, -1, 0])))
  steps = setup.epochs * spe
  out: dict[str, Any] = {
    "label": METHODS.get(variant, variant),
    "lr": hp if variant in (*TUNED, "adam", "psgd_initial_lr") else None,
    "seeds": list(seeds),
    "per_seed": per_seed,
    "curves": curves,
    "final": final,
    "diverged": diverged,
    # The fastest of the runs: the machine may be shared, and interference only adds time.
    "ms_per_step": _round(1000 * min(r["run_s"] for r in runs) / steps, 4),
    "compile_s": _round(setup.compile_s.get(variant, float("nan")), 3),
  }
  if variant in PROBPREC or variant == "psgd_initial_lr":
    out["alpha_cycles"] = [alpha_cycles(r["records"], spe) for r in runs]
    recs = np.stack([r["records"] for r in runs])
    out["frozen_steps"] = int(np.sum(recs[0, :, 3] <= 2))
  return out


def run_setup(setup: Setup, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
  """Experiments 1 and 4 on one setup."""
  seeds = list(range(args.seeds))
  res: dict[str, Any] = {
    "model": setup.model.name,
    "dataset": setup.name.split("/")[1],
    "num_params": setup.num_params,
    "n_train": setup.n_train,
    "n_test": setup.n_test,
    "batch_size": setup.batch_size,
    "epochs": setup.epochs,
    "steps_per_epoch": setup.steps_per_epoch,
    "reestimate_every": setup.reestimate_every,
    "chance_accuracy": setup.chance,
  }
  # SGD's grid on seed 0: the tuned rate has the lowest final training loss.
  grid_loss = {}
  for lr in args.lrs:
    loss = setup.run("sgd", lr, 0)["evals"][-1, 0]
    grid_loss[lr] = loss if np.isfinite(loss) else np.inf
  tuned = min(args.lrs, key=lambda lr: grid_loss[lr])
  res["sgd_tuning"] = {
    "grid": list(args.lrs),
    "seed": 0,
    "final_train_loss": _round([grid_loss[lr] for lr in args.lrs]),
    "tuned_lr": tuned,
  }
  log(f"{setup.name}: SGD tuned lr {tuned:g} (grid {list(args.lrs)})")
  methods: dict[str, Any] = {}
  for m in args.methods:
    hp = tuned if m in TUNED else args.adam_lr if m == "adam" else 0.0
    methods[m] = summarize(setup, m, hp, seeds)
    f = methods[m]["final"]
    log(
      f"{setup.name}: {m:>16s}  test acc {100 * (f['test_accuracy']['mean'] or 0):5.1f} %  "
      f"train loss {f['train_loss']['mean']}  {methods[m]['ms_per_step']} ms/step  "
      f"compile {methods[m]['compile_s']} s"
    )
  res["methods"] = methods
  # Experiment 4: PreconditionedSGD with initial_lr vs SGD at the same rates.
  sens_seeds = list(range(args.sens_seeds))
  sens: dict[str, Any] = {"lrs": list(args.lrs), "seeds": sens_seeds}
  for variant in ("sgd", "psgd_initial_lr"):
    by_lr = {}
    for lr in args.lrs:
      s = summarize(setup, variant, lr, sens_seeds)
      by_lr[f"{lr:g}"] = {
        "final": s["final"],
        "diverged": s["diverged"],
        "test_accuracy_curve": s["curves"]["test_accuracy"]["mean"],
        "train_loss_curve": s["curves"]["train_loss"]["mean"],
      }
      if variant == "psgd_initial_lr":
        by_lr[f"{lr:g}"]["alpha_cycles"] = s["alpha_cycles"]
    sens[variant] = by_lr
    accs = "  ".join(
      f"{k}: {100 * (v['final']['test_accuracy']['mean'] or 0):.1f}" for k, v in by_lr.items()
    )
    log(f"{setup.name}: sensitivity {variant:>16s}  test acc % {accs}")
  res["sensitivity"] = sens
  return res


# --------------------------------------------------------------------------- tables


def _pm(stat: dict[str, Any], scale: float = 1.0, fmt: str = ".1f") -> str:
  if stat["mean"] is None:
    return "n/a"
  return f"{scale * stat['mean']:{fmt}} ± {scale * stat['std']:{fmt}}"


def _adam_lr(results: dict[str, Any], method: str) -> str:
  if method != "adam":
    return ""
  return f"{next(iter(results.values()))['methods']['adam']['lr']:g}"


def final_table(results: dict[str, Any], methods: Sequence[str]) -> str:
  """Final test accuracy (%) and training loss, mean ± std over seeds: methods × setups."""
  setups = list(results)
  head = "| method | " + " | ".join(f"{s} test acc. (%) | {s} train loss" for s in setups) + " |"
  lines = [head, "|---|" + "---:|---:|" * len(setups)]
  for m in methods:
    row = []
    for s in setups:
      r = results[s]["methods"][m]
      extra = f" (lr {r['lr']:g})" if m in TUNED else ""
      extra += f" ({r['diverged']} div.)" if r["diverged"] else ""
      row.append(f"{_pm(r['final']['test_accuracy'], 100)}{extra}")
      row.append(_pm(r["final"]["train_loss"], 1.0, ".3f"))
    label = METHODS[m] + (f" ({args_lr})" if (args_lr := _adam_lr(results, m)) else "")
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def cost_table(results: dict[str, Any], methods: Sequence[str]) -> str:
  """Run time per step (including the per-epoch evaluation) and relative to SGD."""
  setups = list(results)
  lines = [
    "| method | " + " | ".join(f"{s} ms/step | × SGD | frozen steps" for s in setups) + " |",
    "|---|" + "---:|---:|---:|" * len(setups),
  ]
  for m in methods:
    row = []
    for s in setups:
      r = results[s]["methods"][m]
      base = results[s]["methods"].get("sgd", r)["ms_per_step"]
      row += [f"{r['ms_per_step']:.2f}", f"{r['ms_per_step'] / base:.2f}"]
      frozen = r.get("frozen_steps")
      total = results[s]["epochs"] * results[s]["steps_per_epoch"]
      row.append(f"{frozen}/{total}" if frozen is not None else "0")
    lines.append(f"| {METHODS[m]} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def alpha_table(results: dict[str, Any], methods: Sequence[str]) -> str:
  """``α`` per cycle (mean over seeds; range) of the preconditioner variants vs the tuned lr,
  and the range of ``σ·α`` over the cycles, leaves and seeds (``σ·α = 1``: no curvature
  information; the preconditioner scales direction ``j`` by ``σ_j^{-1/2}``)."""
  lines = [
    "| setup | method | tuned SGD lr | α per cycle (epoch: mean over seeds [min, max]) "
    "| σ·α range |",
    "|---|---|---:|---|---|",
  ]
  for s, res in results.items():
    tuned = res["sgd_tuning"]["tuned_lr"]
    for m in methods:
      if m not in PROBPREC:
        continue
      cycles = res["methods"][m]["alpha_cycles"]
      n = min(len(c) for c in cycles)
      cells = []
      for i in range(n):
        vals = _nan([c[i]["alpha"] for c in cycles])
        ep = cycles[0][i]["epoch"]
        if np.all(np.isfinite(vals)):
          cells.append(f"{ep:.2g}: {np.mean(vals):.3g} [{np.min(vals):.3g}, {np.max(vals):.3g}]")
        else:
          cells.append(f"{ep:.2g}: {int(np.sum(~np.isfinite(vals)))} NaN")
      if len(cells) > 6:
        cells = [*cells[:3], "…", *cells[-2:]]
      sa = [
        x * c["alpha"]
        for run in cycles
        for c in run
        for x in (c["sigma_min"], c["sigma_max"])
        if x is not None and c["alpha"] is not None
      ]
      srange = f"[{min(sa):.3g}, {max(sa):.3g}]" if sa else "–"
      row = f"| {s} | {METHODS[m]} | {tuned:g} | " + "; ".join(cells) + f" | {srange} |"
      lines.append(row)
  return "\n".join(lines)


def sensitivity_table(results: dict[str, Any]) -> str:
  """Experiment 4: final test accuracy (%) and training loss vs the (initial) learning rate."""
  setups = list(results)
  head = " | ".join(f"{s} SGD acc. | {s} PSGD acc. | {s} SGD loss | {s} PSGD loss" for s in setups)
  lines = [f"| lr | {head} |", "|---:|" + "---:|---:|---:|---:|" * len(setups)]
  lrs = results[setups[0]]["sensitivity"]["lrs"]
  for lr in lrs:
    row = []
    for s in setups:
      sens = results[s]["sensitivity"]
      a, b = sens["sgd"][f"{lr:g}"], sens["psgd_initial_lr"][f"{lr:g}"]
      for r in (a, b):
        div = f" ({r['diverged']} div.)" if r["diverged"] else ""
        row.append(_pm(r["final"]["test_accuracy"], 100) + div)
      row += [_pm(a["final"]["train_loss"], 1, ".3f"), _pm(b["final"]["train_loss"], 1, ".3f")]
    lines.append(f"| {lr:g} | " + " | ".join(row) + " |")
  return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _nan(values: Any) -> np.ndarray:
  return np.asarray(
    [np.nan if v is None else v for v in np.asarray(values, object).ravel()], np.float64
  ).reshape(np.shape(values))


def _style(method: str) -> dict[str, Any]:
  """Line style of a method: extra curves dashed; AdaptiveSGD wide and pale underneath,
  since OnlyAdaptiveSGD takes exactly the same steps."""
  style: dict[str, Any] = {"color": COLORS[method], "lw": 1.4, "ls": "-"}
  if method in EXTRA:
    style["ls"] = "--"
  if method == "adaptive":
    style.update(lw=4.0, alpha=0.45)
  return style


def curves_figure(results: dict[str, Any], methods: Sequence[str]) -> Figure:
  """Training loss, test loss and test accuracy per epoch: mean over seeds, min–max band."""
  setups = list(results)
  fig = Figure(figsize=(15, 3.7 * len(setups) + 1.0), layout="constrained")
  axes = fig.subplots(len(setups), 3, squeeze=False)
  for i, s in enumerate(setups):
    res = results[s]
    for m in methods:
      r = res["methods"][m]
      label = r["label"] + (f" ({r['lr']:g})" if r["lr"] is not None else "")
      for ax, key in zip(axes[i], ("train_loss", "test_loss", "test_accuracy"), strict=True):
        mean = _nan(r["curves"][key]["mean"])
        seeds = _nan(r["per_seed"][key])
        ep = np.arange(len(mean))
        ax.plot(ep, mean, label=label if (i, key) == (0, "train_loss") else None, **_style(m))
        if seeds.shape[0] > 1:
          with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanmin(seeds, 0), np.nanmax(seeds, 0)
          ax.fill_between(ep, lo, hi, color=COLORS[m], alpha=0.12, lw=0)
    axes[i, 2].axhline(res["chance_accuracy"], color="grey", ls=":", lw=1)
    for ax, title in zip(
      axes[i], ("training loss (train-eval set)", "test loss", "test accuracy"), strict=True
    ):
      ax.set_title(f"{s}: {title}", fontsize=10)
      ax.set_xlabel("epoch")
      ax.grid(alpha=0.3, which="both")
    axes[i, 0].set_yscale("log")
    axes[i, 1].set_yscale("log")
  fig.legend(loc="outside lower center", ncols=3, fontsize=8)
  n = len(next(iter(results.values()))["methods"][methods[0]]["seeds"])
  fig.suptitle(
    f"Experiment 1: mean over {n} seed(s), band: min–max over the seeds (dotted: chance)"
  )
  return fig


def sensitivity_figure(results: dict[str, Any]) -> Figure:
  """Final test accuracy and training loss vs the (initial) learning rate."""
  setups = list(results)
  fig = Figure(figsize=(11, 3.6 * len(setups)), layout="constrained")
  axes = fig.subplots(len(setups), 2, squeeze=False)
  for i, s in enumerate(setups):
    res = results[s]
    sens = res["sensitivity"]
    lrs = np.asarray(sens["lrs"])
    for variant, label, color, marker in (
      ("sgd", "SGD at lr", COLORS["sgd"], "o"),
      ("psgd_initial_lr", "PreconditionedSGD, initial_lr = lr, then α", COLORS["psgd"], "s"),
    ):
      for ax, key in zip(axes[i], ("test_accuracy", "train_loss"), strict=True):
        f = [sens[variant][f"{lr:g}"]["final"][key] for lr in lrs]
        mean = _nan([x["mean"] for x in f])
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", RuntimeWarning)
          lo = np.asarray([np.nanmin(_nan(x["values"])) for x in f])
          hi = np.asarray([np.nanmax(_nan(x["values"])) for x in f])
        yerr = np.nan_to_num(np.stack([mean - lo, hi - mean]))
        ax.errorbar(lrs, mean, yerr=yerr, color=color, marker=marker, ms=4, capsize=3, label=label)
    for ax, key in zip(axes[i], ("test_accuracy", "train_loss"), strict=True):
      if "psgd" in res["methods"]:
        ref = res["methods"]["psgd"]["final"][key]["mean"]
        if ref is not None:
          ax.axhline(ref, color=COLORS["psgd"], ls=":", lw=1, label="PreconditionedSGD, α only")
      ax.axvline(res["sgd_tuning"]["tuned_lr"], color="grey", ls="--", lw=1, label="tuned SGD lr")
      ax.set_xscale("log")
      ax.set_xlabel("learning rate (PreconditionedSGD: of the first cycle)")
      ax.grid(alpha=0.3, which="both")
    axes[i, 0].axhline(res["chance_accuracy"], color="grey", ls=":", lw=1)
    axes[i, 0].set_title(f"{s}: final test accuracy", fontsize=10)
    axes[i, 1].set_title(f"{s}: final training loss", fontsize=10)
    axes[i, 1].set_yscale("log")
  axes[0, 0].legend(fontsize=7)
  n = len(next(iter(results.values()))["sensitivity"]["seeds"])
  fig.suptitle(
    f"Experiment 4: learning-rate sensitivity, mean and min–max over {n} seed(s) "
    "(a diverged run counts in the accuracy, not in the loss)"
  )
  return fig


def alpha_figure(results: dict[str, Any], methods: Sequence[str]) -> Figure:
  """``α`` of every cycle against the epoch where it was estimated, with the tuned SGD lr."""
  setups = list(results)
  fig = Figure(figsize=(6.5 * len(setups), 5.0), layout="constrained")
  axes = fig.subplots(1, len(setups), squeeze=False)[0]
  for ax, s in zip(axes, setups, strict=True):
    res = results[s]
    nonpos = 0
    for m in methods:
      if m not in PROBPREC:
        continue
      cycles = res["methods"][m]["alpha_cycles"]
      for k, run in enumerate(cycles):
        ep = np.asarray([c["epoch"] for c in run])
        al = _nan([c["alpha"] for c in run])
        nonpos += int(np.sum(~(al > 0)))
        ax.plot(
          ep,
          np.where(al > 0, al, np.nan),
          color=COLORS[m],
          marker="o",
          ms=3,
          lw=1.0,
          alpha=0.8,
          ls="--" if m in EXTRA else "-",
          label=(METHODS[m] + (" (α not used)" if m in TUNED else "")) if k == 0 else None,
        )
    tuned = res["sgd_tuning"]["tuned_lr"]
    ax.axhline(tuned, color=COLORS["sgd"], ls=":", lw=1.5, label=f"tuned SGD lr {tuned:g}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (when the cycle's α was estimated)")
    ax.set_ylabel("α (the estimated step size)")
    title = f"{s}: α per cycle, every seed"
    if nonpos:
      title += f" ({nonpos} non-positive α not shown)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  return fig


# --------------------------------------------------------------------------- main


def _git_version() -> str:
  """``git describe --always --dirty`` of the repository (``""`` outside a checkout)."""
  try:
    out = subprocess.run(
      ["git", "describe", "--always", "--dirty"],
      cwd=Path(__file__).resolve().parent,
      capture_output=True,
      text=True,
      timeout=10,
      check=False,
    )
  except OSError:
    return ""
  return out.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--setups", nargs="+", help=f"MODEL/DATASET pairs (default {' '.join(DEFAULT_SETUPS)})"
  )
  parser.add_argument("--data-dir", help="directory of file-based datasets (fashion_mnist, …)")
  parser.add_argument(
    "--methods", nargs="+", choices=list(METHODS), help="methods of experiment 1 (default all)"
  )
  parser.add_argument("--seeds", type=int, help="seeds of experiment 1 (default 3)")
  parser.add_argument("--sens-seeds", type=int, help="seeds of experiment 4 (default 2)")
  parser.add_argument(
    "--lrs", nargs="+", type=float, help=f"SGD tuning and sensitivity grid ({DEFAULT_LRS})"
  )
  parser.add_argument("--adam-lr", type=float, default=1e-3)
  parser.add_argument(
    "--epochs", type=int, help=f"epochs (default per dataset {DEFAULT_EPOCHS}, else 20)"
  )
  parser.add_argument(
    "--batch-size", type=int, help=f"batch size (default per dataset {DEFAULT_BATCH}, else 128)"
  )
  parser.add_argument(
    "--reestimate-epochs",
    type=int,
    help="re-estimate the preconditioner every this many epochs (0: once; default 10)",
  )
  parser.add_argument("--out", default="docs", help="writes OUT/results and OUT/figures")
  parser.add_argument("--quick", action="store_true", help="a tiny smoke-test configuration")
  args = parser.parse_args(argv)
  defaults: dict[str, Any] = {
    "setups": list(DEFAULT_SETUPS),
    "methods": list(METHODS),
    "seeds": 3,
    "sens_seeds": 2,
    "lrs": list(DEFAULT_LRS),
    "epochs": None,
    "reestimate_epochs": 10,
  }
  if args.quick:
    defaults.update(QUICK)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.seeds < 1 or args.sens_seeds < 1:
    parser.error("--seeds and --sens-seeds must be >= 1")
  if args.reestimate_epochs < 0:
    parser.error("--reestimate-epochs must be >= 0")
  if "sgd" not in args.methods:
    args.methods = ["sgd", *args.methods]
  for s in args.setups:
    if s.count("/") != 1:
      parser.error(f"--setups takes MODEL/DATASET, got {s!r}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  t_start = time.perf_counter()

  def log(msg: str) -> None:
    print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

  backend = jax.default_backend()
  log(
    f"setups {args.setups}, methods {args.methods}, {args.seeds} seeds "
    f"(sensitivity {args.sens_seeds}), lrs {args.lrs}, backend {backend}"
  )
  results: dict[str, Any] = {}
  datasets: dict[str, data.Dataset] = {}
  for spec in args.setups:
    model_name, ds_name = spec.split("/")
    if ds_name not in datasets:
      datasets[ds_name] = data.load(ds_name, args.data_dir)
    ds = datasets[ds_name]
    if ds.task != "classification":
      raise SystemExit(f"{ds_name} is a {ds.task} dataset; this experiment needs classification")
    key = ds_name.lower().replace("-", "_")
    setup = Setup(
      model_name,
      ds,
      batch_size=args.batch_size or DEFAULT_BATCH.get(key, OTHER_BATCH),
      epochs=args.epochs or DEFAULT_EPOCHS.get(key, OTHER_EPOCHS),
      reestimate_epochs=args.reestimate_epochs,
    )
    spe = setup.steps_per_epoch
    if any(m in PER_EPOCH for m in args.methods) and spe < 15:
      raise SystemExit(
        f"{setup.name}: {spe} steps per epoch cannot hold the 15-step estimation cycle of "
        f"{', '.join(PER_EPOCH)}; use a smaller --batch-size or leave them out"
      )
    if setup.reestimate_every is not None and setup.reestimate_every < 15:
      raise SystemExit(f"{setup.name}: --reestimate-epochs gives fewer than 15 steps per cycle")
    log(
      f"{setup.name}: {setup.num_params} parameters, batch size {setup.batch_size}, "
      f"{spe} steps/epoch, {setup.epochs} epochs, re-estimation every "
      f"{setup.reestimate_every} steps"
    )
    results[setup.name] = run_setup(setup, args, log)

  wall = time.perf_counter() - t_start
  tables = {
    "final": final_table(results, args.methods),
    "alpha": alpha_table(results, args.methods),
    "sensitivity": sensitivity_table(results),
    "cost": cost_table(results, args.methods),
  }
  print(f"\nFinal test accuracy and training loss, mean ± std over {args.seeds} seed(s):\n")
  print(tables["final"])
  print("\nα per cycle vs the tuned SGD learning rate:\n")
  print(tables["alpha"])
  print(f"\nLearning-rate sensitivity, mean ± std over {args.sens_seeds} seed(s):\n")
  print(tables["sensitivity"])
  print("\nCost per step (run time incl. per-epoch evaluation, after compilation):\n")
  print(tables["cost"])

  out = Path(args.out)
  (out / "results").mkdir(parents=True, exist_ok=True)
  (out / "figures").mkdir(parents=True, exist_ok=True)
  report = {
    "config": {
      "command": "python examples/preconditioner_comparison.py "
      + " ".join(argv if argv is not None else sys.argv[1:]),
      "setups": args.setups,
      "datasets": sorted(datasets),
      "models": sorted({s.split("/")[0] for s in args.setups}),
      "methods": {m: METHODS[m] for m in args.methods},
      "seeds": args.seeds,
      "sensitivity_seeds": args.sens_seeds,
      "lrs": args.lrs,
      "adam_lr": args.adam_lr,
      "epochs": {s: r["epochs"] for s, r in results.items()},
      "batch_size": {s: r["batch_size"] for s, r in results.items()},
      "reestimate_epochs": args.reestimate_epochs,
      "preconditioner": {
        "est_rank": 2,
        "num_observations": 5,
        "prior_iterations": 10,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "faithful": "True except psgd_consistent",
      },
      "loss": "softmax cross-entropy, no weight decay",
      "train_loss_on": "a fixed training subset as large as the test split (train-eval set)",
      "backend": backend,
      "devices": [str(d) for d in jax.devices()],
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "jaxscope": jaxscope.__version__,
      "x64": bool(jax.config.jax_enable_x64),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "git": _git_version(),
      "wall_time_s": round(wall, 1),
    },
    "results": results,
    "tables": tables,
  }
  json_path = out / "results" / "preconditioner_comparison.json"
  json_path.write_text(record.dumps(report, indent=1) + "\n")
  figures: list[tuple[str, Callable[[], Figure]]] = [
    ("probprec_curves.png", lambda: curves_figure(results, args.methods)),
    ("probprec_sensitivity.png", lambda: sensitivity_figure(results)),
    ("probprec_alpha.png", lambda: alpha_figure(results, args.methods)),
  ]
  for name, make in figures:
    make().savefig(out / "figures" / name, dpi=80 if args.quick else 110)
  print(f"\nwrote {json_path} and {len(figures)} figures in {out / 'figures'}")
  print(f"wall time {wall:.1f} s")
  return report


if __name__ == "__main__":
  main()
