"""What per-layer introspection costs on a transformer LM, scanned and unrolled, and the
per-device memory of a fully sharded layout.

Run from the repository root::

    .venv/bin/python benchmarks/transformer.py                       # CPU size
    .venv/bin/python benchmarks/transformer.py --size gpu            # results/gpu/transformer.json
    .venv/bin/python benchmarks/transformer.py --size tiny --reps 2  # a smoke run (seconds)

**Model.** The zoo's ``transformer_lm`` (pre-LayerNorm causal decoder, byte vocabulary 256)
on one fixed batch of ``shakespeare`` windows, Adam at 1e-3, in both layouts: ``scan``
(the blocks stacked by ``nn.scan``, leaves with a leading layer axis, measured per layer
with ``stacked={"^blocks/": 0}`` as ``jaxscope train`` does) and ``unrolled``
(``blocks_0 … blocks_{L−1}``). Sizes (``--size``): ``cpu`` d_model 128, 4 heads, 4 blocks,
64 bytes × batch 16; ``gpu`` d_model 512, 8 heads, 8 blocks, 256 bytes × batch 64;
``tiny`` d_model 32, 2 blocks, 16 bytes × batch 8 (a smoke run).

**Variants** (:func:`jaxscope.train.make_train_step`, jitted with the state donated, every
step measured):

* ``bare``: Adam, no scope (the step still records loss, token accuracy and lr);
* ``economy``: ``monitored(adam, make_scope("economy", stacked=…))``: norm, mean, variance
  of params, grads and updates and the update/weight ratio, per layer of the stack;
* ``full``: the ``full`` scope: economy + 64-bin histograms + power-iteration spectral
  norms + the realised update ratio and lost fraction;
* ``instruments``: what ``jaxscope train --metrics economy`` runs: the economy scope,
  Cockpit's economy instruments and the activation health of the captured layers.

Each variant is compiled ahead of time (``jit(...).lower(...).compile()``: the compile
time and XLA's memory analysis of the step are recorded), warmed up, and the variants
of both layouts are timed interleaved in one process (order rotated every repetition),
each training its own state. Reported: median ms per step, IQR, the ratio to the same
layout's bare step.

**Peak memory.** Each variant runs again in a fresh process for a few steps; its peak
resident set size (``VmHWM``, which includes the compilation), its resident set after the
steps (``VmRSS``) and, where the device reports it, the device's peak bytes in use
(``memory_stats()["peak_bytes_in_use"]``, GPUs) are recorded. XLA's own estimate of
the compiled step (arguments + outputs + temporaries − aliased) is recorded beside it.

**Sharding.** In a child process with 8 simulated CPU devices
(``--xla_force_host_platform_device_count=8``; the bytes are a property of the layout, not
of the platform), the scanned LM's train state with the economy scope is placed on meshes of
N = 1, 2, 4, 8 devices, replicated (``data=N``) and fully sharded (``fsdp=N``, the rule of
:func:`jaxscope.train.sharding.leaf_spec`), and the bytes one device holds
(:func:`jaxscope.train.sharding.device_bytes`) are compared: the target is fully sharded ≈
1/N of replicated. The economy step compiled on each mesh gives XLA's per-device memory,
and the number of all-gathers in the compiled fully sharded step is counted for the bare,
economy and full steps (the scope must add none).

Targets (issue 17): economy ≤ 1.10× the bare step on CPU; on a GPU ≤ 1.05×, full ≤ 3×;
fully sharded per-device memory ≈ 1/N of replicated.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
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

from benchmarks.common import environment, iqr, write_json  # noqa: E402
from jaxscope import data, models, transforms  # noqa: E402
from jaxscope.train import (  # noqa: E402
  TrainState,
  init_instruments,
  make_activation_scope,
  make_instruments,
  make_scope,
  make_train_step,
  sharding,
)
from jaxscope.train.measure import stacked_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES: dict[str, dict[str, int]] = {
  "tiny": {"d_model": 32, "num_heads": 2, "n_layers": 2, "seq_len": 16, "batch": 8, "reps": 3},
  "cpu": {"d_model": 128, "num_heads": 4, "n_layers": 4, "seq_len": 64, "batch": 16, "reps": 30},
  "gpu": {"d_model": 512, "num_heads": 8, "n_layers": 8, "seq_len": 256, "batch": 64, "reps": 30},
}
VARIANTS = ("bare", "economy", "full", "instruments")
LAYOUTS = ("scan", "unrolled")
TARGETS = {"cpu": {"economy": 1.10}, "gpu": {"economy": 1.05, "full": 3.0}}
LEARNING_RATE = 1e-3
WARMUP = 3
RSS_STEPS = 3
DEVICE_COUNTS = (1, 2, 4, 8)
#: The steps whose compiled fully sharded HLO is searched for all-gathers.
HLO_VARIANTS = ("bare", "economy", "full")
MB = 2.0**20


# --------------------------------------------------------------------------- steps


class Problem:
  """The LM of one layout at one size, with its fixed batch."""

  def __init__(self, size: dict[str, int], layout: str, dtype: str, param_dtype: str) -> None:
    ds = data.load("shakespeare", seq_len=size["seq_len"], num_train=size["batch"], num_test=1)
    self.x, self.y = jnp.asarray(ds.train_x), jnp.asarray(ds.train_y)
    self.model = models.build(
      "transformer_lm",
      (size["seq_len"],),
      ds.num_classes,
      d_model=size["d_model"],
      num_heads=size["num_heads"],
      n_layers=size["n_layers"],
      scan=layout == "scan",
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.stacked = stacked_of(self.model)  # None when unrolled
    self.low_precision = jnp.dtype(param_dtype).itemsize < 4

  def init_params(self) -> Any:
    """Fresh parameters (the same values on every call)."""
    return self.model.init(jax.random.key(0), self.x[:1])["params"]


def build_step(problem: Problem, variant: str) -> tuple[Callable[..., Any], Callable[[], Any]]:
  """The jittable step ``(state, x, y, measure) -> (state, values)`` of ``variant`` and a
  function creating its initial :class:`~jaxscope.train.TrainState`."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  preset = {"bare": None, "economy": "economy", "full": "full", "instruments": "economy"}[variant]
  sc = None
  tx = optax.adam(LEARNING_RATE)
  if preset is not None:
    sc = make_scope(preset, stacked=problem.stacked, low_precision=problem.low_precision)
    tx = transforms.monitored(tx, sc)
  inst = make_instruments("economy") if variant == "instruments" else None
  act = make_activation_scope(stacked=problem.stacked) if inst is not None else None
  step = make_train_step(
    problem.model,
    tx,
    monitored=sc is not None,
    instruments=inst,
    activation_scope=act,
    learning_rate=LEARNING_RATE,
  )

  def init_state() -> TrainState:
    params = problem.init_params()
    istate: Any = ()
    if inst is not None:
      istate = init_instruments(
        problem.model, inst, params, {}, problem.x, problem.y, activation_scope=act
      )
    return TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), istate)

  return step, init_state


def memory_analysis(compiled: Any) -> dict[str, float] | None:
  """XLA's memory estimate of a compiled program in MB (per device for a sharded one):
  arguments, outputs, temporaries, and ``peak = arguments + outputs + temporaries −
  aliased`` (the donated state is aliased to the new one)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if m is None:
    return None
  arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  return {
    "argument_mb": round(arg / MB, 3),
    "output_mb": round(out / MB, 3),
    "temp_mb": round(temp / MB, 3),
    "alias_mb": round(alias / MB, 3),
    "peak_mb": round((arg + out + temp - alias) / MB, 3),
  }


class Variant:
  """One compiled variant with its own state, ready to be timed."""

  def __init__(self, problem: Problem, variant: str) -> None:
    step, init_state = build_step(problem, variant)
    self.problem = problem
    self.state = jax.jit(init_state)()
    jitted = jax.jit(functools.partial(step, measure=True), donate_argnums=0)
    t0 = time.perf_counter()
    self.compiled = jitted.lower(self.state, problem.x, problem.y).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory = memory_analysis(self.compiled)
    self.values: dict[str, Any] = {}

  def __call__(self) -> float:
    """One step; returns its wall time in ms (all outputs ready)."""
    t0 = time.perf_counter()
    self.state, self.values = self.compiled(self.state, self.problem.x, self.problem.y)
    jax.block_until_ready((self.state, self.values))
    return (time.perf_counter() - t0) * 1e3


# --------------------------------------------------------------------------- timing


def time_variants(
  size: dict[str, int], layouts: Sequence[str], variants: Sequence[str], args: argparse.Namespace
) -> tuple[dict[str, np.ndarray], dict[str, Variant]]:
  """Interleaved per-step times (ms) of every ``layout/variant``."""
  runs: dict[str, Variant] = {}
  for layout in layouts:
    problem = Problem(size, layout, args.dtype, args.param_dtype)
    for variant in variants:
      name = f"{layout}/{variant}"
      runs[name] = Variant(problem, variant)
      first = runs[name]()  # the first call after compiling
      for _ in range(WARMUP - 1):
        runs[name]()
      print(
        f"  {name}: compiled in {runs[name].compile_s:.1f} s, warm-up {first:.1f} ms",
        flush=True,
      )
  names = list(runs)
  times: dict[str, list[float]] = {n: [] for n in names}
  for rep in range(args.reps):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      times[name].append(runs[name]())
  for name, run in runs.items():  # The timings mean little if training diverged.
    loss = float(run.values["loss"])
    if not np.isfinite(loss):
      raise RuntimeError(f"{name}: the loss became {loss} during the benchmark.")
  return {n: np.asarray(t) for n, t in times.items()}, runs


# --------------------------------------------------------------------------- children


def _child_argv(args: argparse.Namespace) -> list[str]:
  return [
    sys.executable,
    __file__,
    "--size",
    args.size,
    "--dtype",
    args.dtype,
    "--param-dtype",
    args.param_dtype,
  ]


def _last_json(proc: subprocess.CompletedProcess) -> dict[str, Any]:
  if proc.returncode != 0:
    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory(args: argparse.Namespace, layout: str, variant: str) -> dict[str, Any]:
  """Peak RSS (and device peak) of a fresh process running ``RSS_STEPS`` steps."""
  spec = f"{layout}:{variant}"
  proc = subprocess.run(
    [*_child_argv(args), "--child-memory", spec], capture_output=True, text=True, cwd=_ROOT
  )
  return _last_json(proc)


def _child_memory(args: argparse.Namespace, spec: str) -> None:
  layout, variant = spec.split(":")
  run = Variant(Problem(SIZES[args.size], layout, args.dtype, args.param_dtype), variant)
  for _ in range(RSS_STEPS):
    run()
  # VmHWM, not ru_maxrss: the latter survives exec(), so a child of a large parent would
  # report the parent's peak.
  status = Path("/proc/self/status").read_text()
  kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
         if line.startswith(("VmHWM:", "VmRSS:"))}  # fmt: skip
  out: dict[str, Any] = {
    "peak_rss_mb": round(kib["VmHWM"] / 1024, 1),  # compilation included
    "rss_after_steps_mb": round(kib["VmRSS"] / 1024, 1),
    "device_peak_mb": None,
  }
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = round(stats["peak_bytes_in_use"] / MB, 1)
  print(json.dumps(out))


def sharded_memory(args: argparse.Namespace) -> dict[str, Any]:
  """The sharding measurement, in a child process with 8 simulated CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(DEVICE_COUNTS)}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [*_child_argv(args), "--child-sharding"], capture_output=True, text=True, cwd=_ROOT, env=env
  )
  return _last_json(proc)


_GATHER = re.compile(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(")


def all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
  """The result shapes of the all-gather operations of an HLO module's text (sync, or the
  first result of an async ``all-gather-start``)."""
  return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _GATHER.findall(hlo)]


def whole_kernel_shapes(params: Any) -> set[tuple[int, ...]]:
  """The shapes of the kernels (leaves of two or more axes) the partition rule shards (at
  least :data:`~jaxscope.train.sharding.MIN_SHARD_SIZE` elements), and of one layer of each
  stacked ``blocks`` kernel: an all-gather with such a result gathers a whole kernel.

  Vectors are left out: a gathered ``[512]`` may be a stacked bias's layer as well as a
  power-iteration vector ``W·v`` of the same length; shapes cannot tell them apart.
  """
  shapes = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    stacked = getattr(path[0], "key", None) == "blocks"  # [L, ...]: the scan gathers a layer
    if leaf.size < sharding.MIN_SHARD_SIZE or leaf.ndim < 2 + stacked:
      continue
    shapes.add(tuple(leaf.shape))
    if stacked:
      shapes.add(tuple(leaf.shape[1:]))
  return shapes


def _on_mesh(
  problem: Problem, variant: str, mesh: Any
) -> tuple[TrainState, Any, Callable[..., Any]]:
  """The state of ``variant`` placed on ``mesh`` by the loop's rule, and the compiled step
  (state in and out in that layout, the batch split over the mesh)."""
  step, init_state = build_step(problem, variant)
  shardings = sharding.state_shardings(mesh, jax.eval_shape(init_state))
  state = jax.jit(init_state, out_shardings=shardings)()
  batch = sharding.batch_sharding(mesh)
  jitted = jax.jit(
    functools.partial(step, measure=True),
    in_shardings=(shardings, batch, batch),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  x = jax.device_put(problem.x, batch)
  y = jax.device_put(problem.y, batch)
  return state, shardings, jitted.lower(state, x, y).compile()


def _child_sharding(args: argparse.Namespace) -> None:
  size = SIZES[args.size]
  problem = Problem(size, "scan", args.dtype, args.param_dtype)
  devices = jax.devices()
  records = []
  for n in DEVICE_COUNTS:
    if n > len(devices) or size["batch"] % n:
      continue
    rec: dict[str, Any] = {"devices": n}
    for layout, spec in (("replicated", {"data": n}), ("fsdp", {"fsdp": n})):
      mesh = sharding.make_mesh(spec, devices[:n])
      state, _, compiled = _on_mesh(problem, "economy", mesh)
      rec[layout] = {
        "state_mb": round(sharding.device_bytes(state) / MB, 4),
        "params_mb": round(sharding.device_bytes(state.params) / MB, 4),
        "step": memory_analysis(compiled),
      }
    rep, fs = rec["replicated"], rec["fsdp"]
    rec["state_fraction"] = fs["state_mb"] / rep["state_mb"]
    rec["params_fraction"] = fs["params_mb"] / rep["params_mb"]
    if rep["step"] and fs["step"]:
      rec["step_peak_fraction"] = fs["step"]["peak_mb"] / rep["step"]["peak_mb"]
    records.append(rec)
    print(f"  {n} devices: state {rec['state_fraction']:.3f} of replicated", file=sys.stderr)
  n = max(r["devices"] for r in records)
  mesh = sharding.make_mesh({"fsdp": n}, devices[:n])
  kernels = whole_kernel_shapes(problem.init_params())
  shapes = {v: all_gather_shapes(_on_mesh(problem, v, mesh)[2].as_text()) for v in HLO_VARIANTS}
  gathers: dict[str, Any] = {"devices": n, "layout": f"fsdp={n}"}
  for variant, found in shapes.items():
    extra = list((Counter(found) - Counter(shapes["bare"])).elements())
    gathers[variant] = {
      "all_gathers": len(found),
      "whole_kernel": sum(s in kernels for s in found),
      "extra_over_bare": [list(s) for s in extra],
      "extra_whole_kernel": sum(s in kernels for s in extra),
    }
  out = {"records": records, "all_gathers": gathers}
  print(json.dumps(out))


# --------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the benchmark; returns the JSON-ready report."""
  size = SIZES[args.size]
  load_before = os.getloadavg()[0]
  print(f"transformer_lm ({args.size}): {args.reps} interleaved repetitions of "
        f"{', '.join(args.variants)} × {', '.join(args.layouts)}", flush=True)  # fmt: skip
  times, runs = time_variants(size, args.layouts, args.variants, args)
  load_after = os.getloadavg()[0]
  records = []
  for name, run_ in runs.items():
    layout, variant = name.split("/")
    med = float(np.median(times[name]))
    bare = f"{layout}/bare"
    rec: dict[str, Any] = {
      "layout": layout,
      "variant": variant,
      "ms": round(med, 3),
      "iqr_ms": round(iqr(times[name]), 3),
      "ratio": round(med / float(np.median(times[bare])), 3) if bare in times else None,
      "compile_s": round(run_.compile_s, 2),
      "xla_memory": run_.memory,
      "values": len(run_.values),
      "final_loss": float(run_.values["loss"]),
    }
    if args.rss:
      rec.update(peak_memory(args, layout, variant))
      print(f"  {name}: peak RSS {rec['peak_rss_mb']} MB", flush=True)
    records.append(rec)
  report: dict[str, Any] = {
    **environment(),
    "benchmark": "transformer",
    "size": args.size,
    "model": {k: v for k, v in size.items() if k != "reps"},
    "parameters": models.count_params(next(iter(runs.values())).state.params),
    "dtype": args.dtype,
    "param_dtype": args.param_dtype,
    "reps": args.reps,
    "load_1min": {"before": round(load_before, 2), "after_timing": round(load_after, 2)},
    "targets": TARGETS.get(args.size, TARGETS["cpu"]),
    "records": records,
  }
  if args.sharding:
    print("sharding: 1/2/4/8 simulated CPU devices (child process)", flush=True)
    report["sharding"] = sharded_memory(args)
  return report


def format_table(report: dict[str, Any]) -> str:
  """A readable table of the report."""
  head = (
    f"{'layout':<9} {'variant':<12} {'ms':>9} {'(IQR)':>8} {'ratio':>7} {'compile s':>9} "
    f"{'XLA peak MB':>11} {'RSS MB peak/after':>17}"
  )
  lines = [
    f"transformer_lm {report['size']} ({report['parameters']:,} parameters), device "
    f"{report['device']}, {report['cpu_count']} CPUs, load {report['load_1min']}",
    head,
    "-" * len(head),
  ]
  for r in report["records"]:
    xla = r["xla_memory"]["peak_mb"] if r["xla_memory"] else None
    rss = "" if "peak_rss_mb" not in r else f"{r['peak_rss_mb']:.0f}/{r['rss_after_steps_mb']:.0f}"
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}x"
    lines.append(
      f"{r['layout']:<9} {r['variant']:<12} {r['ms']:>9.2f} {r['iqr_ms']:>8.2f} {ratio:>7} "
      f"{r['compile_s']:>9.1f} {'' if xla is None else f'{xla:.1f}':>11} "
      f"{rss:>17}"
    )
  sh = report.get("sharding")
  if sh:
    lines += ["", "per-device MB, replicated → fully sharded (fraction; ideal 1/N):"]
    for r in sh["records"]:
      rep, fs = r["replicated"], r["fsdp"]
      step = ""
      if "step_peak_fraction" in r:
        step = (
          f", compiled step {rep['step']['peak_mb']:.2f} → {fs['step']['peak_mb']:.2f} "
          f"({r['step_peak_fraction']:.3f})"
        )
      lines.append(
        f"  N={r['devices']}: state {rep['state_mb']:.3f} → {fs['state_mb']:.3f} "
        f"({r['state_fraction']:.3f}, 1/N = {1 / r['devices']:.3f}){step}"
      )
    g = sh["all_gathers"]
    lines.append(f"  all-gathers in the compiled step ({g['layout']}; of a whole kernel):")
    for v in HLO_VARIANTS:
      r = g[v]
      lines.append(
        f"    {v}: {r['all_gathers']} ({r['whole_kernel']}); over bare: "
        f"{len(r['extra_over_bare'])} ({r['extra_whole_kernel']}) "
        f"{r['extra_over_bare'][:6]}{' ...' if len(r['extra_over_bare']) > 6 else ''}"
      )
  return "\n".join(lines)


def _list(choices: Sequence[str]) -> Callable[[str], list[str]]:
  def parse(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
      raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}.")
    return names

  return parse


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  """Command-line entry point; returns the report."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="cpu", help="model size (cpu).")
  ap.add_argument("--out", type=Path, default=None, help="JSON output path.")
  ap.add_argument("--reps", type=int, default=None, help="timed steps per variant.")
  ap.add_argument("--variants", type=_list(VARIANTS), default=list(VARIANTS))
  ap.add_argument("--layouts", type=_list(LAYOUTS), default=list(LAYOUTS))
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the RSS processes.")
  ap.add_argument("--no-sharding", dest="sharding", action="store_false")
  ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--child-sharding", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child_memory:
    _child_memory(args, args.child_memory)
    return None
  if args.child_sharding:
    _child_sharding(args)
    return None
  if args.reps is None:
    args.reps = SIZES[args.size]["reps"]
  if args.reps < 1:
    ap.error("--reps must be >= 1.")
  if "bare" not in args.variants:
    args.variants = ["bare", *args.variants]  # the ratios' reference
  if args.out is None:
    suffix = "" if args.dtype == args.param_dtype == "float32" else f"-{args.param_dtype}"
    args.out = {
      "cpu": RESULTS / f"transformer{suffix}.json",
      "gpu": RESULTS / "gpu" / f"transformer{suffix}.json",
      "tiny": RESULTS / f"transformer-tiny{suffix}.json",
    }[args.size]
  report = run(args)
  print()
  print(format_table(report))
  write_json(report, args.out)
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
