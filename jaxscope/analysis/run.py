"""The run-level analysis API: what ``jaxscope analyze`` computes, from Python.

:func:`analyze` runs the checkpoint analyses of one training run (a :class:`RunLike`:
its checkpoints, model and dataset) on the test split, writes the same files as
``jaxscope analyze RUN WHAT`` (``NAME.npz`` + ``NAME.json`` and PNG figures per analysis)
and returns what it computed as an :class:`AnalysisReport`::

    run = jaxscope.load_run("runs/mlp")
    report = jaxscope.analysis.analyze(run, "path", alphas=(-0.5, 1.5, 41))
    report.results["path"].value["linear"].loss        # a PathResult per path kind
    print("\\n".join(report.summary))

The analyses (:data:`ANALYSES`):

* ``path``: the model-level linear and (with ≥ 3 checkpoints) quadratic paths from
  ``θ_0`` (the first checkpoint) to ``θ_f`` (the last) through ``θ_mid`` (the middle one),
  against every checkpoint's true loss projected on the path;
* ``layers`` and ``params``: the same paths per layer and for single scalars;
* ``landscape``: a 1-D or 2-D loss landscape around ``θ_f`` along filter-normalised random
  directions or the trajectory's PCA;
* ``trajectory``: the loss on the trajectory's PCA plane with each checkpoint's true loss
  next to the plane's;
* ``robustness``: re-initialisation and re-randomisation of each layer (classification).

Options (:class:`AnalysisOptions`) mirror the command line's flags and hold its defaults.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from jaxscope.analysis import reports

__all__ = [
  "ANALYSES",
  "AnalysisOptions",
  "AnalysisReport",
  "AnalysisResult",
  "Axis",
  "RunLike",
  "analyze",
  "parse_axis",
  "parse_grid",
  "parse_param_choice",
]

#: The analyses of :func:`analyze`, in the order ``"all"`` runs them.
ANALYSES = ("path", "layers", "params", "landscape", "trajectory", "robustness")

#: ``(start, stop, num)``: ``num`` points on ``[start, stop]`` (``numpy.linspace``).
Axis = tuple[float, float, int]

# Checkpoints are kept in memory when all of them together take at most this much.
_CACHE_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------ options


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def parse_axis(value: str | Sequence[Any]) -> Axis:
  """``"start:stop:num"`` or ``(start, stop, num)`` as a checked :data:`Axis`.

  ``num ≥ 1``; 0 is a valid bound (unlike the original's falsy check that rejected
  ``--y=0:1:51``).

  Raises:
    ValueError: not three values, bounds not finite numbers, ``num < 1``, or
      ``start == stop`` with ``num > 1``.
  """
  if isinstance(value, str):
    parts: list[Any] = value.strip().split(":")
  else:
    parts = list(value) if isinstance(value, Sequence) else []
  if len(parts) != 3:
    raise ValueError(f"expected start:stop:num, got {value!r}")
  try:
    if not isinstance(value, str) and not _is_int(parts[2]):
      raise ValueError
    lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
  except (ValueError, TypeError):
    raise ValueError(f"expected numbers start:stop:num, got {value!r}") from None
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise ValueError(f"start and stop must be finite, got {value!r}")
  if n < 1:
    raise ValueError(f"num must be at least 1, got {value!r}")
  if n > 1 and lo == hi:
    raise ValueError(f"start equals stop with num > 1 in {value!r}")
  return lo, hi, n


def parse_grid(value: str | Sequence[Any]) -> tuple[Axis, Axis]:
  """``"x0:x1:nx[,y0:y1:ny]"``, one :data:`Axis` or a pair of them, as ``(x, y)``;
  without a y part, y is the same as x.

  Raises:
    ValueError: more than two axes, or a bad axis (:func:`parse_axis`).
  """
  if isinstance(value, str):
    parts: list[Any] = value.split(",")
  elif not isinstance(value, Sequence):
    parts = []
  elif len(value) == 3 and not any(isinstance(v, str | Sequence) for v in value):
    parts = [value]
  else:
    parts = list(value)
  if not 1 <= len(parts) <= 2:
    raise ValueError(f"expected x0:x1:nx[,y0:y1:ny], got {value!r}")
  x = parse_axis(parts[0])
  return x, (parse_axis(parts[1]) if len(parts) == 2 else x)


def parse_param_choice(value: str | Sequence[Any]) -> tuple[str, int]:
  """``"top:K"``, ``"random:K"`` (``K`` defaults to 10) or ``(how, K)`` as ``(how, K)``.

  Raises:
    ValueError: ``how`` is not ``top`` or ``random``, or ``K`` is not a positive integer.
  """
  if isinstance(value, str):
    how, _, k = value.strip().partition(":")
  elif isinstance(value, Sequence) and len(value) == 2:
    how, k = value
  else:
    how, k = None, None
  if how not in ("top", "random"):
    raise ValueError(f"expected top:K or random:K, got {value!r}")
  if isinstance(k, str):
    if not k:
      return how, 10
    try:
      k = int(k)
    except ValueError:
      raise ValueError(f"expected a positive integer, got {k!r}") from None
  if not _is_int(k):
    raise ValueError(f"expected a positive integer, got {k!r}")
  if k < 1:
    raise ValueError(f"expected a positive integer, got {k}")
  return how, int(k)


def _positive(name: str, value: Any, *, optional: bool = False) -> None:
  if optional and value is None:
    return
  if not _is_int(value) or value < 1:
    none = " or None" if optional else ""
    raise ValueError(f"analyze: {name} must be a positive integer{none}, got {value!r}.")


@dataclass(frozen=True)
class AnalysisOptions:
  """The options of :func:`analyze`, with the defaults of ``jaxscope analyze``.

  Ranges may be given as tuples or in the command line's text form (``"-1:1:21"``);
  they are stored parsed. Invalid values raise ``ValueError`` naming the option.
  """

  alphas: Axis = (-0.5, 1.5, 41)
  """Path coordinates ``(A, B, N)``: N points on [A, B]; 0 is ``θ_0``, 1 is ``θ_f``."""
  grid: tuple[Axis, Axis] = ((-1.0, 1.0, 21), (-1.0, 1.0, 21))
  """Landscape grid ``(x, y)`` (one axis: y = x); the trajectory uses only the counts
  ``nx, ny`` and covers the projected path with a margin."""
  one_d: bool = False
  """A 1-D landscape along one direction, on the x axis of :attr:`grid`."""
  directions: str = "random"
  """Landscape directions: ``"random"`` (filter-normalised, Li et al.) or ``"pca"``."""
  seed: int = 0
  """Of the random directions and the parameter sampling."""
  layers: str | None = None
  """Regex selecting the layers (layers, params, robustness); ``None``: all."""
  params: tuple[str, int] = ("top", 10)
  """Scalars of the parameter-level paths: ``("top", K)`` the K largest ``|θ_f − θ_0|``,
  ``("random", K)`` K at random."""
  mid_time: bool = False
  """Put ``θ_mid`` of the quadratic path at its true time fraction instead of α = 0.5."""
  eval_examples: int | None = None
  """Evaluate on N test examples, a fixed subset (``None``: the whole test split)."""
  eval_batch_size: int = 500
  dpi: int = 100
  """Of the PNG figures."""

  def __post_init__(self) -> None:
    def parsed(name: str, parse: Callable[[Any], Any]) -> None:
      try:
        object.__setattr__(self, name, parse(getattr(self, name)))
      except (ValueError, TypeError) as e:
        raise ValueError(f"analyze: {name}: {e}") from None

    parsed("alphas", parse_axis)
    parsed("grid", parse_grid)
    parsed("params", parse_param_choice)
    if self.directions not in ("random", "pca"):
      raise ValueError(f"analyze: directions must be 'random' or 'pca', got {self.directions!r}.")
    if not _is_int(self.seed):
      raise ValueError(f"analyze: seed must be an integer, got {self.seed!r}.")
    if self.layers is not None and not isinstance(self.layers, str):
      raise ValueError(f"analyze: layers must be a regex string or None, got {self.layers!r}.")
    _positive("eval_examples", self.eval_examples, optional=True)
    _positive("eval_batch_size", self.eval_batch_size)
    _positive("dpi", self.dpi)
    for name in ("one_d", "mid_time"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"analyze: {name} must be True or False, got {getattr(self, name)!r}.")


# --------------------------------------------------------------------------- run, results


class RunLike(Protocol):
  """What :func:`analyze` needs of a run (``jaxscope.load_run`` returns one); any object
  with these attributes will do.

  * ``path``: the run directory (the default output is ``path / "analysis"``);
  * ``config``: its ``config.json`` (``model`` and ``dataset`` are recorded in the results);
  * ``checkpoints``: a :class:`jaxscope.checkpoint.RunCheckpoints` (``steps``, ``iter()``
    skipping damaged steps, ``restore(step)``), open for the call;
  * ``model``: the rebuilt model (:class:`jaxscope.models.ModelDef`:
    ``apply(variables, x, train=False) -> (outputs, …)`` and ``init(key, x)``);
  * ``dataset``: ``train_x``, ``test_x``, ``test_y``, ``num_classes``;
  * ``task``: ``"classification"`` or ``"regression"``.
  """

  @property
  def path(self) -> Path: ...
  @property
  def config(self) -> dict[str, Any]: ...
  @property
  def checkpoints(self) -> Any: ...
  @property
  def model(self) -> Any: ...
  @property
  def dataset(self) -> Any: ...
  @property
  def task(self) -> str: ...


class AnalysisResult(NamedTuple):
  """One analysis of :func:`analyze`: what it computed and what it wrote."""

  name: str
  """One of :data:`ANALYSES`."""
  value: Any
  """The result objects: ``path``: ``{kind: PathResult}`` (kind ``"linear"``,
  ``"quadratic"``); ``layers``: ``{kind: {layer: PathResult}}``; ``params``:
  ``{kind: [PathResult]}``; ``landscape`` and ``trajectory``: a
  :class:`~jaxscope.analysis.Landscape`; ``robustness``: a
  :class:`~jaxscope.analysis.RobustnessResult`."""
  arrays: dict[str, np.ndarray]
  """What ``NAME.npz`` holds."""
  meta: dict[str, Any]
  """What ``NAME.json`` holds (as ``json.load`` reads it back)."""
  files: list[Path]
  """The files written: ``NAME.npz``, ``NAME.json``, then the figures."""
  summary: list[str]
  """The lines of the summary ``jaxscope analyze`` prints for it."""
  seconds: float


class AnalysisReport(NamedTuple):
  """What :func:`analyze` did."""

  out: Path
  """The output directory."""
  info: dict[str, Any]
  """What every analysis shares (also in each ``NAME.json``): run, model, dataset, task,
  evaluation set, checkpoint steps, ``θ_0``/``θ_mid``/``θ_f``, BatchNorm policy."""
  results: dict[str, AnalysisResult]
  """By analysis name, in the order run."""
  skipped: dict[str, str]
  """Analyses of ``"all"`` that do not apply to the run, with the reason."""
  failed: dict[str, str]
  """Analyses that raised ``ValueError`` (when several were asked for), with the message."""
  files: list[Path]
  """Every file written, in order."""
  summary: list[str]
  """The whole summary ``jaxscope analyze`` prints, line by line."""


# ------------------------------------------------------------------------------- session


class RunAnalysis:
  """What the analyses of one :func:`analyze` call share: the run's model, the evaluation
  set, each checkpoint's true loss, and cached intermediate results (internal; the
  functions of :mod:`jaxscope.analysis.reports` take it).

  Raises:
    ValueError: fewer than two readable checkpoints.
  """

  def __init__(
    self,
    run: RunLike,
    options: AnalysisOptions,
    out: Path,
    echo: Callable[[str], None] | None = None,
  ) -> None:
    self.run = Path(run.path)
    self.options = options
    self.out = out
    self.ckpts = run.checkpoints
    self.lines: list[str] = []
    self._echo = echo
    self._paths: dict[str, Any] | None = None
    self._pca: Any = None
    self._setup(run)

  def _eval_subset(self, n_test: int) -> tuple[np.ndarray, str]:
    n = self.options.eval_examples
    if n and n < n_test:
      idx = np.sort(np.random.default_rng(0).permutation(n_test)[:n])
      return idx, "sorted first N of numpy.random.default_rng(0).permutation(n_test)"
    return np.arange(n_test), "the whole test split"

  def _setup(self, run: RunLike) -> None:
    from jaxscope.analysis import make_batch_evaluator, make_eval_set

    opts, ckpts = self.options, self.ckpts
    config, ds = run.config, run.dataset
    self.task = run.task
    self.model = model = run.model
    self.apply_fn = lambda p, s, x: model.apply({"params": p, **s}, x, train=False)[0]
    n_test = len(ds.test_x)
    idx, rule = self._eval_subset(n_test)
    self.eval_indices = idx
    self.eval_set = make_eval_set(ds.test_x[idx], ds.test_y[idx], batch_size=opts.eval_batch_size)
    self.num_classes = int(ds.num_classes)
    self.init_x = np.asarray(ds.train_x[:1])
    self._read_checkpoints(make_batch_evaluator(self.apply_fn, self.eval_set, task=self.task))
    T = len(self.steps)
    self.mid_index = (T - 1) // 2 if T >= 3 else None
    self.mid = ckpts.restore(self.steps[self.mid_index]) if self.mid_index is not None else None
    if self.mid is not None and opts.mid_time:
      s0, sm, sf = self.steps[0], self.steps[self.mid_index], self.steps[-1]
      self.mid_alpha = (sm - s0) / (sf - s0)
    else:
      self.mid_alpha = 0.5
    self.state_f = self.final.model_state
    self.has_state = bool(jax.tree.leaves(self.state_f))
    self.alphas = np.linspace(*opts.alphas)
    self.info = {
      "run_dir": str(self.run),
      "model": config.get("model"),
      "dataset": config.get("dataset"),
      "task": self.task,
      "eval": {
        "split": "test",
        "n": self.eval_set.n,
        "of": n_test,
        "subset": rule,
        "digest": self.eval_set.digest,
        "batch_size": opts.eval_batch_size,
      },
      "checkpoints": self.steps,
      "theta_0": self.steps[0],
      "theta_f": self.steps[-1],
      "theta_mid": None if self.mid is None else self.steps[self.mid_index],
      "mid_alpha": self.mid_alpha if self.mid is not None else None,
      "bn_policy": "keep (the final checkpoint's statistics at every point)"
      if self.has_state
      else "none (the model has no BatchNorm statistics)",
      "mode": "evaluation (train=False)",
    }

  def _read_checkpoints(self, batch_eval: Callable[[Any, Any], Any]) -> None:
    """One pass over the checkpoints (damaged ones skipped with a warning): each one's
    true loss with its own BatchNorm statistics; small models stay cached."""

    def one(p: Any, s: Any) -> Any:
      return batch_eval(jax.tree.map(lambda v: v[None], p), jax.tree.map(lambda v: v[None], s))

    one = jax.jit(one)
    ckpts = self.ckpts
    self.steps: list[int] = []
    loss, acc, logged = [], [], []
    self._cache: dict[int, Any] = {}
    self.keep_all = True
    last = None
    for ck in ckpts.iter():
      lo, ac = one(ck.params, ck.model_state)
      loss.append(float(lo[0]))
      acc.append(float(ac[0]))
      logged.append(ck.meta.get("eval_loss"))
      if not self.steps:
        size = sum(x.nbytes for x in jax.tree.leaves(ck.params))
        self.keep_all = size * len(ckpts.steps) <= _CACHE_BYTES
        self.first = ck
      if self.keep_all:
        self._cache[len(self.steps)] = ck.params
      self.steps.append(ck.step)
      last = ck
    if len(self.steps) < 2:
      raise ValueError(
        f"analyze: {self.run} has {len(self.steps)} readable checkpoint(s) {self.steps}; the "
        "analyses need at least the initial and the final one."
      )
    self.final = last
    self.true_loss = np.asarray(loss)
    self.true_accuracy = np.asarray(acc)
    self.logged_loss = [None if v is None else float(v) for v in logged]

  def params(self, i: int) -> Any:
    """The parameters of checkpoint ``i`` (an index into :attr:`steps`)."""
    if i in self._cache:
      return self._cache[i]
    if i == 0:
      return self.first.params
    if i == len(self.steps) - 1:
      return self.final.params
    return self.ckpts.restore(self.steps[i]).params

  def say(self, text: str) -> None:
    """Adds a line to the summary (and echoes it)."""
    self.lines.append(text)
    if self._echo is not None:
      self._echo(text)

  def save_fig(self, fig: Any, name: str) -> Path:
    path = self.out / name
    fig.savefig(path, dpi=self.options.dpi)
    return path

  def model_paths(self) -> dict[str, Any]:
    """The model-level linear (and, with ≥ 3 checkpoints, quadratic) paths, cached."""
    if self._paths is None:
      from jaxscope.analysis import model_path

      kw = {"alphas": self.alphas, "model_state": self.state_f, "task": self.task}
      th0, thf = self.first.params, self.final.params
      self._paths = {"linear": model_path(self.apply_fn, self.eval_set, th0, thf, **kw)}
      if self.mid is not None:
        self._paths["quadratic"] = model_path(
          self.apply_fn,
          self.eval_set,
          th0,
          thf,
          theta_mid=self.mid.params,
          mid=self.mid_alpha,
          **kw,
        )
    return self._paths

  def lazy(self) -> Any:
    from jaxscope.analysis import LazyCheckpoints

    return LazyCheckpoints(load=self.params, length=len(self.steps))

  def pca(self) -> Any:
    """PCA of the whole trajectory (streamed), up to two directions, cached."""
    if self._pca is None:
      from jaxscope.analysis import pca_directions

      self._pca = pca_directions(self.lazy(), n=min(2, len(self.steps) - 1))
    return self._pca

  def kinds(self) -> list[tuple[str, dict[str, Any]]]:
    """``(kind, path keyword arguments)`` of the linear and (when possible) quadratic path."""
    out = [("linear", {})]
    if self.mid is not None:
      out.append(("quadratic", {"theta_mid": self.mid.params, "mid": self.mid_alpha}))
    return out


# ------------------------------------------------------------------------------- analyze

_RUNNERS: dict[str, Callable[[RunAnalysis], reports.Written]] = {
  "path": reports.path,
  "layers": reports.layers,
  "params": reports.params,
  "landscape": reports.landscape,
  "trajectory": reports.trajectory,
  "robustness": reports.robustness,
}


def _names(what: str | Sequence[str]) -> list[str]:
  if isinstance(what, str):
    names = list(ANALYSES) if what == "all" else [what]
  else:
    names = list(what) if isinstance(what, Sequence) else [what]
  bad = [n for n in names if n not in ANALYSES]
  if not names or bad:
    got = repr(bad[0]) if bad else "none"
    raise ValueError(
      f"analyze: what must be 'all', one of {', '.join(ANALYSES)} or a sequence of them; got {got}."
    )
  return list(dict.fromkeys(names))


def _run_one(an: RunAnalysis, name: str) -> AnalysisResult:
  start = len(an.lines)
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # NaN losses are expected to occur.
    written = _RUNNERS[name](an)
  seconds = time.perf_counter() - t0
  return AnalysisResult(name, *written, summary=an.lines[start:], seconds=seconds)


def _header(an: RunAnalysis) -> Iterator[str]:
  es = an.eval_set
  yield (
    f"{an.run}: {len(an.steps)} checkpoints (steps {an.steps[0]} … {an.steps[-1]}); eval set: "
    f"{es.n} test examples (digest {es.digest}); output: {an.out}"
  )
  if an.has_state:
    yield "  note: BatchNorm statistics of the final checkpoint are used at every point."


def analyze(
  run: RunLike,
  what: str | Sequence[str] = "all",
  *,
  out: str | Path | None = None,
  options: AnalysisOptions | None = None,
  echo: Callable[[str], None] | None = None,
  on_failure: Callable[[str, Exception], None] | None = None,
  **option_values: Any,
) -> AnalysisReport:
  """Runs checkpoint analyses of a run, writes their files and returns the results.

  Does what ``jaxscope analyze RUN WHAT`` does, with the same files (``NAME.npz``,
  ``NAME.json``, PNG figures) into ``out``. ``θ_0`` is the first readable checkpoint,
  ``θ_f`` the last, ``θ_mid`` the middle one (with ≥ 3 checkpoints); every point is
  evaluated on the test split (or a fixed subset) in evaluation mode, with the final
  checkpoint's BatchNorm statistics.

  Args:
    run: the run (:class:`RunLike`, e.g. ``jaxscope.load_run(path)``); its checkpoints
      must stay open during the call.
    what: ``"all"``, one name of :data:`ANALYSES`, or a sequence of them.
    out: the output directory (created; default ``run.path / "analysis"``).
    options: the options (default :class:`AnalysisOptions`'s defaults).
    echo: called with each summary line as soon as it is known (e.g. ``print``).
    on_failure: called with ``(name, error)`` when an analysis fails and the others go on.
    **option_values: fields of :class:`AnalysisOptions` that replace those of ``options``
      (e.g. ``grid="-1:1:11"``, ``directions="pca"``).

  Returns:
    An :class:`AnalysisReport`. With ``what="all"`` (or a sequence), an analysis that
    raises ``ValueError`` is recorded in ``failed`` and the others still run; with
    ``"all"``, ``robustness`` is skipped for a run that is not a classification.

  Raises:
    ValueError: an unknown analysis or a bad option (the message names it), a run with
      fewer than two readable checkpoints, or the failure of the single analysis asked for.
  """
  names = _names(what)
  options = options if options is not None else AnalysisOptions()
  if option_values:
    unknown = sorted(set(option_values) - {f.name for f in dataclasses.fields(AnalysisOptions)})
    if unknown:
      raise TypeError(f"analyze: unknown option(s) {', '.join(unknown)}.")
    options = dataclasses.replace(options, **option_values)
  keep_going = not isinstance(what, str) or what == "all"
  an = RunAnalysis(run, options, Path(out) if out else Path(run.path) / "analysis", echo)
  an.out.mkdir(parents=True, exist_ok=True)
  for line in _header(an):
    an.say(line)
  results: dict[str, AnalysisResult] = {}
  skipped, failed = {}, {}
  for name in names:
    if name == "robustness" and what == "all" and an.task != "classification":
      skipped[name] = f"{an.task} run"
      an.say(f"robustness: skipped ({an.task} run).")
      continue
    try:
      results[name] = res = _run_one(an, name)
    except ValueError as e:
      if not keep_going:
        raise
      failed[name] = str(e)
      if on_failure is not None:
        on_failure(name, e)
      continue
    an.say(f"  ({name}: {res.seconds:.1f} s)")
  files = [f for r in results.values() for f in r.files]
  an.say(f"wrote {len(files)} files to {an.out}")
  return AnalysisReport(an.out, an.info, results, skipped, failed, files, an.lines)
