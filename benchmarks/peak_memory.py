"""What the instruments' step holds in memory: XLA's own buffer sizes, and the peak formula.

Run from the repository root::

    .venv/bin/python benchmarks/peak_memory.py
    .venv/bin/python benchmarks/peak_memory.py --problems mnist_mlp --batches 32,128

For each problem (``benchmarks/problems.py``), preset and batch size it compiles the SGD
step with the preset's instruments exactly as ``benchmarks/costs.py`` times it (the
updates declared in the span, the XLA options ``jaxscope train`` chooses, every argument
donated) and reads XLA's buffer assignment (``compiled.memory_analysis()``): the
arguments (parameters, optimizer state, instrument state, batch), the temporaries, and
how much of the outputs reuse donated arguments. Nothing runs, so the figures are exact
for the compiled program and free of the process's own memory (the runtime, the
compiler), which ``benchmarks/cockpit_presets.py`` measures as peak RSS.

Two batch sizes give the temporaries' line ``temp = 4·(t_P·P + t_B·B)`` bytes per
problem and preset (``P`` parameters, ``B`` examples), reported with the floats per
example the model's layers output (``D + A``: the input and every module's output, from
``capture_intermediates``). ``docs/instruments.md`` ("Memory") turns the measured
coefficients into the documented peak formula.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402

from benchmarks import costs, problems  # noqa: E402
from benchmarks.common import environment, problem_list, write_json  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "peak-memory-cpu.json"
PRESETS = ("economy", "business", "full")


def activation_floats(problem: problems.Problem) -> tuple[int, int]:
  """``(D, A)``: the input floats of one example and the floats every module of the model
  outputs for it (``capture_intermediates``: Dense and Conv outputs, the logits)."""
  x1 = problem.x[:1]
  _, inter = problem.model.apply(
    {"params": problem.params}, x1, capture_intermediates=True, mutable=["intermediates"]
  )
  return int(x1.size), int(sum(a.size for a in jax.tree.leaves(inter)))


def step_memory(problem: problems.Problem, preset: str, batch: int) -> dict[str, int]:
  """XLA's buffer sizes in bytes of ``preset``'s instrument step on ``batch`` examples."""
  if not 1 <= batch <= problem.x.shape[0]:
    raise ValueError(f"peak_memory: batch must be in [1, {problem.x.shape[0]}], got {batch}.")
  sub = problem._replace(x=problem.x[:batch], y=problem.y[:batch])
  fn, state = costs.instrument_step(sub, costs.INSTRUMENT_PRESETS[preset])
  m = fn.lower(*state, sub.x, sub.y).compile().memory_analysis()
  return {
    "argument_bytes": int(m.argument_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "instrument_state_bytes": int(sum(a.nbytes for a in jax.tree.leaves(state[2]))),
  }


#: The documented bound on the temporaries, ``4·(T_P·P + T_B·B·(D + A))`` bytes
#: (``docs/instruments.md``, "Memory"): every row measured stays under it.
T_P, T_B = 10, 10


def bound_bytes(num_params: int, batch: int, floats_per_example: int) -> int:
  """The documented bound on a step's temporaries in bytes: ``4·(10·P + 10·B·(D + A))``."""
  return 4 * (T_P * num_params + T_B * batch * floats_per_example)


def fit_line(rows: Sequence[dict[str, Any]], num_params: int) -> dict[str, float]:
  """``t_P`` and ``t_B`` of ``temp = 4·(t_P·P + t_B·B)`` through the smallest and the
  largest batch, and ``s_P``, the instrument state in floats per parameter."""
  lo, hi = min(rows, key=lambda r: r["batch"]), max(rows, key=lambda r: r["batch"])
  if hi["batch"] == lo["batch"]:
    raise ValueError("peak_memory: the line needs two batch sizes.")
  t_b = (hi["temp_bytes"] - lo["temp_bytes"]) / 4 / (hi["batch"] - lo["batch"])
  t_p = (lo["temp_bytes"] / 4 - t_b * lo["batch"]) / num_params
  return {"t_P": t_p, "t_B": t_b, "s_P": lo["instrument_state_bytes"] / 4 / num_params}


def run(problem_names: Sequence[str], batches: Sequence[int]) -> dict[str, Any]:
  """Compiles every (problem, preset, batch) and returns the JSON-ready report."""
  out: list[dict[str, Any]] = []
  for name in problem_names:
    problem = problems.get(name)
    num_params = int(sum(a.size for a in jax.tree.leaves(problem.params)))
    d, a = activation_floats(problem)
    for preset in PRESETS:
      rows = []
      for b in batches:
        rows.append({"batch": b, **step_memory(problem, preset, b)})
        r = rows[-1]
        r["temp_over_bound"] = r["temp_bytes"] / bound_bytes(num_params, b, d + a)
        print(
          f"{name:13s} {preset:9s} B={b:4d}  arguments {r['argument_bytes'] / 2**20:7.1f} MiB"
          f"  temporaries {r['temp_bytes'] / 2**20:7.1f} MiB"
          f"  reused {r['alias_bytes'] / 2**20:7.1f} MiB"
          f"  temporaries/bound {r['temp_over_bound']:.2f}",
          flush=True,
        )
      fit = fit_line(rows, num_params)
      print(
        f"{name:13s} {preset:9s} P={num_params}  D+A={d + a}  state {fit['s_P']:.2f}·P"
        f"  temp ≈ 4·({fit['t_P']:.2f}·P + {fit['t_B']:.0f}·B)"
        f" = 4·({fit['t_P']:.2f}·P + {fit['t_B'] / (d + a):.2f}·(D+A)·B)",
        flush=True,
      )
      out.append(
        {
          "problem": name,
          "preset": preset,
          "params": num_params,
          "input_floats": d,
          "activation_floats": a,
          "rows": rows,
          **fit,
          "t_B_per_activation": fit["t_B"] / (d + a),
        }
      )
  worst = max(r["temp_over_bound"] for res in out for r in res["rows"])
  print(f"largest temporaries/bound: {worst:.2f} (bound 4·({T_P}·P + {T_B}·B·(D+A)) bytes)")
  return {"environment": environment(), "bound": {"T_P": T_P, "T_B": T_B}, "results": out}


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--problems",
    type=problem_list,
    default=["mnist_mlp", "cifar10_3c3d", "fmnist_2c2d"],
    help="comma-separated benchmark problems",
  )
  ap.add_argument(
    "--batches",
    default="32,128",
    help="comma-separated batch sizes (two or more; at most the problem's batch, 128)",
  )
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = ap.parse_args(argv)
  try:
    batches = sorted({int(b) for b in args.batches.split(",")})
  except ValueError:
    ap.error(f"--batches must be comma-separated ints, got {args.batches!r}.")
  if len(batches) < 2 or batches[0] < 1 or batches[-1] > problems.BATCH:
    ap.error(f"--batches needs two or more sizes in [1, {problems.BATCH}], got {args.batches!r}.")
  report = run(args.problems, batches)
  write_json(report, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
