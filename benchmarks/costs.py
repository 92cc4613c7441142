"""A cost model per instrument: its arithmetic floor against what it costs in the step.

Run from the repository root::

    .venv/bin/python benchmarks/costs.py                                  # both problems
    .venv/bin/python benchmarks/costs.py --problems mnist_mlp --reps 20   # one, fewer reps
    .venv/bin/python benchmarks/costs.py --problems cifar10_3c3d --which instruments \
        --floors-only --out benchmarks/results/costs-floors-cpu-cifar10_3c3d.json

For each problem (``benchmarks/problems.py``) and each measurement — every per-layer
statistic of the scope on its own, the scope presets, every Cockpit quantity of
:func:`jaxscope.metrics.instruments` on its own and the instrument presets — it reports:

* **floor**: the FLOPs and bytes the measurement cannot do without (table below), and the
  time they take at this machine's own rates: ``max(flops / R_mm, bytes / R_red)``, a
  roofline. ``R_mm`` is the rate of a plain jitted matmul of the problem's widest layer
  (``[B, d_in] @ [d_in, d_out]`` and with ``8B`` rows, the faster), ``R_red`` that of a
  plain jitted ``sum`` over a float32 array of the model's size; both are measured in the
  same process.
* **measured**: the median over repetitions of ``(its turn − its base step's turn)``, the
  median time of a turn's counted calls (:func:`_paired_extra`; the bare SGD step for
  the scope's rows, the instruments' step measuring only the loss for theirs:
  :func:`_bases`), the variants timed in turns of ``--block`` (4) calls back to back,
  the first of each turn not counted (:func:`time_interleaved`), and interleaved (every
  repetition gives each variant one turn, in a rotated order), after warm-up, with
  donated parameters as in a training loop;
* **ratio** measured / floor, and the whole step's ratio to the bare step.
* **extra / XLA floor** (the scope's ``economy``, ``ratio`` and ``full`` rows): the measured
  extra against that of the least XLA program that computes the same sums in the same step
  (:data:`XLA_FLOORS` and :mod:`benchmarks.scope_floor`, rows ``xla_floor/…``), and the
  paired difference of the two (``extra_minus_xla_floor_ms``). On XLA:CPU each full
  reduction is its own loop, and those over a weight gradient (stored column-major by its
  ``dot``) run as tiled reduce-windows at a fraction of ``R_red``; the roofline cannot see
  that, this floor does. The instruments' rows with Hessian-vector products are set
  against their products at the timed cost of one product in the least XLA program that
  computes ``k`` of them (:mod:`benchmarks.hvp_floor`, row ``xla_floor/hvps``) plus the
  roofline floor of the rest (``xla_floor_extra_ms``; :func:`_hvp_floors`).

Every step, floor programs included, is compiled with the XLA:CPU options ``jaxscope
train`` chooses for it by default (``--xla-options auto``, :func:`jaxscope.xla.step_options`:
``lean_compile`` on a convolutional model, else ``fewer_copies`` for a step with the
Hutchinson sums, else none); ``--xla-options none`` gives XLA's own everywhere.

The floors of the measurements are tabulated in :mod:`benchmarks.floors`, with the model's
shape and the machine's rates they use. Nothing is timed in the tests; the script writes
JSON to ``benchmarks/results/costs-cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import economy_floor, hvp_floor, problems, scope_floor  # noqa: E402
from benchmarks.common import (  # noqa: E402
  copy_tree,
  environment,
  iqr,
  problem_list,
  step_options,
  write_json,
)
from benchmarks.floors import floor, floor_ms, machine_rates, shape_facts  # noqa: E402
from jaxscope import metrics, transforms, xla  # noqa: E402
from jaxscope.metrics import instruments as make_instruments  # noqa: E402
from jaxscope.metrics.instruments import (  # noqa: E402
  HUTCHINSON_QUANTITIES,
  INSTRUMENT_PRESETS,
  QUANTITIES,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "costs-cpu.json"
LEARNING_RATE = 0.01
WARMUP = 3
K_PROBES = 8  # The instruments' default ``hutchinson_probes``.

Step = Callable[..., tuple[Any, ...]]
#: The ``--xla-options`` names every step is compiled with (``["auto"]``: per step what
#: ``jaxscope train`` chooses, :func:`benchmarks.common.step_options`).
XLA_OPTIONS: list[str] = ["auto"]


def _options(problem: problems.Problem, hessian_sums: bool = False) -> dict[str, Any] | None:
  """``jax.jit``'s ``compiler_options`` for a step of ``problem`` under :data:`XLA_OPTIONS`."""
  return xla.compiler_options(step_options(problem, XLA_OPTIONS, hessian_sums=hessian_sums))


# --------------------------------------------------------------------------- the variants


def _losses_fn(problem: problems.Problem) -> Callable[..., jax.Array]:
  def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = problem.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  return losses_fn


def scope_step(problem: problems.Problem, sc: Any) -> tuple[Step, tuple]:
  """The jitted SGD step with ``sc`` (``None``: bare) in :func:`transforms.monitored`."""
  tx = optax.sgd(LEARNING_RATE) if sc is None else transforms.monitored(optax.sgd(0.01), sc)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
    if sc is None:
      updates, opt_state = tx.update(grads, opt_state, params)
      out: Any = loss
    else:
      updates, opt_state = tx.update(grads, opt_state, params, value=loss)
      out = (loss, transforms.monitored_metrics(opt_state))
    return optax.apply_updates(params, updates), opt_state, out

  jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=_options(problem))
  return jitted, (copy_tree(problem.params), tx.init(problem.params))


#: The least XLA program for a scope row: ``{row: (topics, sums)}``. The program is the bare
#: SGD step plus, for each leaf of each topic, the sums the row's statistics are made of
#: (``Σx``, ``Σx²``), returned as one vector: no per-layer scalar work, no state, no
#: check. What it costs over the bare step is what these reductions cost in this step on
#: this backend, the floor that the scope's own code can approach but not pass.
XLA_FLOORS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
  "scope/economy": (("params", "grads", "updates"), (1, 2)),
  "scope/ratio": (("params", "updates"), (2,)),
}


def xla_floor_step(problem: problems.Problem, row: str) -> tuple[Step, tuple]:
  """The jitted SGD step computing only the sums of :data:`XLA_FLOORS` ``[row]``."""
  topics, powers = XLA_FLOORS[row]
  tx = optax.sgd(LEARNING_RATE)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    trees = {"params": params, "grads": grads, "updates": updates}
    sums = [
      jnp.sum(leaf if k == 1 else jnp.square(leaf))
      for t in topics
      for leaf in jax.tree.leaves(trees[t])
      for k in powers
    ]
    return optax.apply_updates(params, updates), opt_state, (loss, jnp.stack(sums))

  jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=_options(problem))
  return jitted, (copy_tree(problem.params), tx.init(problem.params))


def instrument_step(problem: problems.Problem, quantities: Sequence[str]) -> tuple[Step, tuple]:
  """The jitted SGD step measuring ``quantities`` with :func:`metrics.instruments`, told
  that its updates are SGD's (``updates_in_span``, as ``jaxscope train`` tells them)."""
  tx = optax.sgd(LEARNING_RATE)
  inst = make_instruments(quantities, updates_in_span=True)
  losses_fn = _losses_fn(problem)

  def step(params: Any, opt_state: Any, istate: Any, x: jax.Array, y: jax.Array) -> Any:
    probe = inst.grad(istate, losses_fn, params, x, y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    values, istate = inst.update(istate, probe, updates, learning_rate=LEARNING_RATE)
    return optax.apply_updates(params, updates), opt_state, istate, values

  state = (copy_tree(problem.params), tx.init(problem.params), inst.init(problem.params))
  options = _options(problem, hessian_sums=bool(set(quantities) & HUTCHINSON_QUANTITIES))
  return jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=options), state


def variants(
  problem: problems.Problem, which: str, rows: Sequence[str] | None = None
) -> dict[str, Callable[[], tuple]]:
  """Builders of every measured variant by name (``which``: all, scope or instruments;
  ``rows``: only these and the base steps)."""
  out: dict[str, Callable[[], tuple]] = {"bare": lambda: scope_step(problem, None)}
  if which in ("all", "scope"):
    for topic in ("params", "grads", "updates"):
      out[f"scope/{topic}_moments"] = lambda t=topic: scope_step(
        problem, metrics.scope(**{t: ["norm", "mean", "variance"]})
      )
    out["scope/ratio"] = lambda: scope_step(problem, metrics.scope(updates=["ratio"]))
    out["scope/params_histogram"] = lambda: scope_step(problem, metrics.scope(params=["histogram"]))
    out["scope/params_spectral_norm"] = lambda: scope_step(
      problem, metrics.scope(params=["spectral_norm"], kind="kernel")
    )
    for preset in ("economy", "full"):
      out[f"scope/{preset}"] = lambda p=preset: scope_step(problem, metrics.scope(preset=p))
    for row in XLA_FLOORS:
      out[f"xla_floor/{row}"] = lambda r=row: xla_floor_step(problem, r)
    out["xla_floor/scope/full"] = lambda: scope_floor.full_step(
      problem, LEARNING_RATE, _options(problem)
    )
  if which in ("all", "instruments"):
    for q in QUANTITIES:
      out[q] = lambda q=q: instrument_step(problem, (q,))
    for preset, qs in INSTRUMENT_PRESETS.items():
      out[f"instruments/{preset}"] = lambda qs=qs: instrument_step(problem, qs)
    out["xla_floor/hvps"] = lambda: hvp_floor.hvps_step(
      problem, K_PROBES, LEARNING_RATE, _options(problem)
    )
    if problem.name == "mnist_mlp":  # Dense layers only: the floor program's model.
      out["xla_floor/instruments/economy"] = lambda: economy_floor.economy_step(
        problem, LEARNING_RATE, _options(problem)
      )
  if rows is not None:
    unknown = sorted(set(rows) - set(out))
    if unknown:
      raise ValueError(f"costs: --rows {unknown} are not rows of --which {which}: {sorted(out)}")
    bases = {"bare"} | ({"loss"} if "loss" in out else set())
    out = {k: v for k, v in out.items() if k in bases or k in rows}
  return out


def time_interleaved(
  problem: problems.Problem, builders: dict[str, Callable[[], tuple]], reps: int, block: int = 1
) -> dict[str, np.ndarray]:
  """Interleaved timings (ms) per variant, after :data:`WARMUP` calls each.

  Each turn of a variant makes ``block`` calls back to back, as a training loop does; with
  ``block > 1`` the first call of each turn, which pays for reading the parameters back
  from memory after the other variants' steps pushed them out of the caches, is not
  counted (30 variants of the MLP cycle ~300 MB of buffers between two turns of one)."""
  steps, states = {}, {}
  for name, build in builders.items():
    t0 = time.perf_counter()
    steps[name], states[name] = build()
    for _ in range(WARMUP):
      out = steps[name](*states[name], problem.x, problem.y)
      jax.block_until_ready(out)
      states[name] = out[: len(states[name])]
    print(f"  {problem.name}/{name}: ready ({time.perf_counter() - t0:.1f} s)", flush=True)
  names = list(builders)
  times: dict[str, list[float]] = {n: [] for n in names}
  for rep in range(reps):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      for call in range(block):
        t0 = time.perf_counter()
        out = steps[name](*states[name], problem.x, problem.y)
        jax.block_until_ready(out)
        if block == 1 or call > 0:
          times[name].append((time.perf_counter() - t0) * 1e3)
        states[name] = out[: len(states[name])]
  return {n: np.asarray(t) for n, t in times.items()}


# --------------------------------------------------------------------------- report


def _per_turn(t: np.ndarray, block: int) -> np.ndarray:
  """The median of each turn's counted calls (one value per repetition)."""
  per = max(block - 1, 1)
  return np.median(t.reshape(-1, per), axis=1)


def _paired_extra(turns: np.ndarray, base_turns: np.ndarray) -> float:
  """The median over repetitions of (this variant's turn − its base's turn).

  The shared 2-core machine drifts between a fast and a slow state (every step ~1.4×
  slower in the latter, memory-bound work more) for seconds at a time; turns of one
  repetition run close together, so their difference cancels most of it where a
  difference of medians does not (it gave negative extras for cheap rows).
  """
  return float(np.median(turns - base_turns))


def _bases(times: dict[str, np.ndarray]) -> Callable[[str], str]:
  """Each measurement's base: ``bare`` (the plain SGD step) for the scope's rows; for the
  instruments' rows the ``loss`` variant, the same step through
  :func:`metrics.instruments` measuring only the loss, which every step computes anyway.

  The two paths are different programs (the instruments' step takes the mean of the
  per-example losses), and in one process their times can differ by more than the
  cheap instruments cost: bare 9.8 ms against 7.0 ms for ``loss`` in one run, 5.3 ms in
  another process. Against the other path's base the cheap rows came out negative.
  """

  def base_of(v: str) -> str:
    instrument = v in QUANTITIES or v.startswith("instruments/")
    return "loss" if instrument and v != "loss" and "loss" in times else "bare"

  return base_of


def _quantities(row: str) -> tuple[str, ...]:
  """The instrument quantities a row measures (none for the scope's rows)."""
  if row.startswith("instruments/"):
    return INSTRUMENT_PRESETS[row.split("/", 1)[1]]
  return (row,) if row in QUANTITIES else ()


def _hvp_floors(rows: list[dict], facts: dict, rates: dict, hvps_extra_ms: float) -> None:
  """Sets each row that computes Hessian-vector products against the XLA floor of
  :mod:`benchmarks.hvp_floor`: its ``n`` products at the timed cost of one plain product,
  plus the roofline floor of the rest (``xla_floor_extra_ms``, ``extra_over_xla_floor``)."""
  per_hvp = hvps_extra_ms / K_PROBES
  for row in rows:
    n = hvp_floor.hvp_count(_quantities(row["measurement"]), K_PROBES)
    if n == 0:
      continue
    rest = {"flops": row["floor_flops"] - n * facts["F_hvp"], "bytes": row["floor_bytes"]}
    xla = hvp_floor.xla_floor_ms(n, per_hvp, floor_ms(rest, rates))
    row["xla_floor_extra_ms"] = xla
    row["extra_over_xla_floor"] = row["extra_ms"] / xla if xla > 0 else None


def run(
  names: Sequence[str],
  reps: int | None,
  which: str,
  block: int = 1,
  rows_only: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Measures every problem of ``names`` (``rows_only``: those rows); returns the report."""
  report: dict[str, Any] = {
    "environment": environment(),
    "block": block,
    "xla_options": list(XLA_OPTIONS),
    "problems": {},
  }
  for name in names:
    problem = problems.get(name)
    facts = shape_facts(problem)
    rates = machine_rates(problem, facts)
    print(f"{name}: P = {facts['P']:,}, R_mm = {rates['R_mm_gflops']:.1f} GFLOP/s, "
          f"R_red = {rates['R_red_gbps']:.1f} GB/s", flush=True)  # fmt: skip
    n = reps or problem.default_reps
    times = time_interleaved(problem, variants(problem, which, rows_only), n, block)
    turns = {k: _per_turn(t, block) for k, t in times.items()}
    bare = float(np.median(times["bare"]))
    base_of = _bases(times)
    rows = []
    for v, t in times.items():
      if v == "bare":
        continue
      base_name = base_of(v)
      base = float(np.median(times[base_name]))
      med = float(np.median(t))
      fl = floor(v, facts)
      f_ms = floor_ms(fl, rates)
      extra = _paired_extra(turns[v], turns[base_name])
      rows.append(
        {
          "measurement": v,
          "base": base_name,
          "base_ms": base,
          "floor_flops": fl["flops"],
          "floor_bytes": fl["bytes"],
          "floor_ms": f_ms,
          "step_ms": med,
          "step_iqr_ms": iqr(t),
          "extra_ms": extra,
          "step_ratio": (base + extra) / base,
          "floor_step_ratio": (base + f_ms) / base,
          "extra_over_floor": extra / f_ms if f_ms > 0 else None,
        }
      )
      if f"xla_floor/{v}" in times:
        xla_extra = _paired_extra(turns[f"xla_floor/{v}"], turns[base_name])
        rows[-1]["xla_floor_extra_ms"] = xla_extra
        rows[-1]["extra_over_xla_floor"] = extra / xla_extra if xla_extra > 0 else None
        # Directly: the row's turn against the floor program's turn of the same repetition.
        rows[-1]["extra_minus_xla_floor_ms"] = _paired_extra(turns[v], turns[f"xla_floor/{v}"])
    if "xla_floor/hvps" in turns:
      _hvp_floors(rows, facts, rates, _paired_extra(turns["xla_floor/hvps"], turns["bare"]))
    report["problems"][name] = {
      "facts": {k: v for k, v in facts.items() if k not in ("leaf_sizes",)},
      "rates": rates,
      "bare_ms": bare,
      "bare_iqr_ms": iqr(times["bare"]),
      "instruments_base_ms": float(np.median(times["loss"])) if "loss" in times else None,
      "reps": len(times["bare"]),
      "rows": rows,
    }
  return report


def format_table(report: dict[str, Any]) -> str:
  """The report as a Markdown table per problem."""
  lines = []
  for name, r in report["problems"].items():
    rt = r["rates"]
    lines.append(
      f"\n{name}: bare step {r['bare_ms']:.2f} ms (IQR {r['bare_iqr_ms']:.2f}; the "
      f"instruments' rows against their loss-only step, {r['instruments_base_ms'] or 0:.2f} "
      "ms), "
      f"P = {r['facts']['P']:,}, R_mm {rt['R_mm_gflops']:.1f} GFLOP/s, "
      f"R_red {rt['R_red_gbps']:.1f} GB/s, {r['reps']} reps\n"
    )
    lines.append(
      "| measurement | floor GFLOP | floor MB | floor ms | extra ms | extra / floor "
      "| step / bare | floor step / bare | extra / XLA floor |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
      ratio = row["extra_over_floor"]
      ratio_s = "–" if ratio is None else f"{ratio:.1f}×"
      xla = row.get("extra_over_xla_floor")
      if xla is None:
        xla_s = "–"
      elif "extra_minus_xla_floor_ms" in row:  # A floor program of its own, timed in pairs.
        xla_s = f"{xla:.2f}× ({row['extra_minus_xla_floor_ms']:+.2f} ms)"
      else:  # Products at the timed cost of hvp_floor's, the rest at its roofline floor.
        xla_s = f"{xla:.2f}× (of {row['xla_floor_extra_ms']:.1f} ms)"
      lines.append(
        f"| {row['measurement']} | {row['floor_flops'] / 1e9:.3f} | "
        f"{row['floor_bytes'] / 1e6:.1f} | {row['floor_ms']:.3f} | {row['extra_ms']:.2f} | "
        f"{ratio_s} | {row['step_ratio']:.2f}× | {row['floor_step_ratio']:.2f}× | {xla_s} |"
      )
  return "\n".join(lines)


def floors_only(
  names: Sequence[str], reps: int | None, which: str, rows_only: Sequence[str] | None = None
) -> dict[str, Any]:
  """The floors without timing the measurements: each row's floor and the step its floor
  alone would make (``floor_step_ratio``), against its base step timed here (medians of
  ``reps``, default 5). For a problem whose measured steps take seconds (the 3c3d's
  Hessian presets), this says in a minute whether a target can be met at all."""
  report: dict[str, Any] = {
    "environment": environment(),
    "floors_only": True,
    "xla_options": list(XLA_OPTIONS),
    "problems": {},
  }
  for name in names:
    problem = problems.get(name)
    facts = shape_facts(problem)
    rates = machine_rates(problem, facts)
    bases = {}
    for base, (step, state) in {
      "bare": scope_step(problem, None),
      "loss": instrument_step(problem, ("loss",)),
    }.items():
      times = []
      for i in range(WARMUP + (reps or 5)):
        t0 = time.perf_counter()
        out = step(*state, problem.x, problem.y)
        jax.block_until_ready(out)
        state = out[: len(state)]
        if i >= WARMUP:
          times.append((time.perf_counter() - t0) * 1e3)
      bases[base] = float(np.median(times))
    base_of = _bases(bases)
    rows = []
    for v in variants(problem, which, rows_only):
      if v in ("bare", "loss") or v.startswith("xla_floor/"):
        continue
      fl = floor(v, facts)
      f_ms, b_ms = floor_ms(fl, rates), bases[base_of(v)]
      rows.append(
        {"measurement": v, "base": base_of(v), "base_ms": b_ms, "floor_ms": f_ms,
         "floor_step_ratio": (b_ms + f_ms) / b_ms, "floor_flops": fl["flops"],
         "floor_bytes": fl["bytes"]}
      )  # fmt: skip
      print(f"{name} {v}: floor {f_ms:.1f} ms, floor step {rows[-1]['floor_step_ratio']:.2f}x")
    report["problems"][name] = {
      "facts": facts,
      "rates": rates,
      "base_ms": bases,
      "rows": rows,
    }
  return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command line: ``--problems``, ``--reps``, ``--which``, ``--rows``, ``--out``,
  ``--floors-only``."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--problems", type=problem_list, default=["mnist_mlp", "cifar10_3c3d"])
  ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
  ap.add_argument("--which", choices=("all", "scope", "instruments"), default="all")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  ap.add_argument(
    "--block", type=int, default=4,
    help="calls per turn of a variant, back to back; the first of each is not counted",
  )  # fmt: skip
  ap.add_argument(
    "--rows", type=lambda v: [r for r in v.split(",") if r], default=None,
    help="comma-separated rows to measure (the base steps are always timed)",
  )  # fmt: skip
  ap.add_argument(
    "--floors-only", action="store_true",
    help="compute the floors and time only the base steps (no measurement is timed)",
  )  # fmt: skip
  ap.add_argument(
    "--xla-options", default="auto",
    help="comma list of jaxscope.xla.STEP_OPTIONS for every step; 'auto' (the default): per "
    "step what jaxscope train chooses (jaxscope.xla.step_options); 'none': XLA's own",
  )  # fmt: skip
  args = ap.parse_args(argv)
  names = [n for n in args.xla_options.split(",") if n]
  if names not in (["auto"], ["none"]):
    try:
      xla.compiler_options(names)
    except ValueError as e:
      ap.error(f"{e}; or auto or none")
  XLA_OPTIONS[:] = names
  if args.reps is not None and args.reps < 1:
    ap.error(f"--reps must be >= 1, got {args.reps}")
  if args.block < 1:
    ap.error(f"--block must be >= 1, got {args.block}")
  if args.floors_only:
    report = floors_only(args.problems, args.reps, args.which, args.rows)
    write_json(report, args.out)
    print(f"\nwrote {args.out}")
    return report
  try:
    report = run(args.problems, args.reps, args.which, args.block, args.rows)
  except ValueError as e:
    ap.error(str(e))
  print(format_table(report))
  write_json(report, args.out)
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
