"""The configuration of a training run: one schema for the loop, the command line and the docs.

:class:`TrainConfig` is the single definition of what a run is configured by. Each field
carries, in its ``metadata``, the command-line spelling (flags, parser, group, help), so
``jaxscope train``'s flags and the options table of ``docs/train_options.md`` are
generated from it (:mod:`jaxscope.run.options`): a new option is
written once. ``config.json`` of a run directory holds the fields (:func:`config_record`)
plus derived keys (:data:`DERIVED_KEYS`); :func:`TrainConfig.from_record` reads it back.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxscope.run.capacity import CAPACITY_DEFAULTS, parse_capacity
from jaxscope.transforms.aliases import OPTIMIZER_DEFAULTS, optimizer_hparams
from jaxscope.xla import compiler_options

__all__ = [
  "CAPACITY_DEFAULTS",
  "DERIVED_KEYS",
  "DTYPES",
  "MESH_AXES",
  "OPTIMIZER_DEFAULTS",
  "RESUME_KEYS",
  "TrainConfig",
  "batch_split",
  "check_config",
  "comma_list",
  "config_record",
  "kv_pairs",
  "non_negative_int",
  "optimizer_hparams",
  "optional_float",
  "parse_capacity",
  "parse_mesh",
  "positive_int",
]


# --------------------------------------------------------------------------- value parsers
# Command-line spellings of field values; each raises ValueError with what was expected.


def positive_int(text: str) -> int:
  """``"3"`` → 3; an integer ≥ 1."""
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise ValueError(f"expected a positive integer, got {value}")
  return value


def non_negative_int(text: str) -> int:
  """``"0"`` → 0; an integer ≥ 0."""
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f"expected an integer >= 0, got {text!r}") from None
  if value < 0:
    raise ValueError(f"expected an integer >= 0, got {value}")
  return value


def optional_float(text: str) -> float | None:
  """``"0.5"`` → 0.5, ``"none"`` → ``None``."""
  if text.strip().lower() == "none":
    return None
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"expected a number or 'none', got {text!r}") from None


def _top_level_split(text: str) -> list[str]:
  """``text`` split at the commas outside brackets and quotes (``"a=(1,2),b=3"`` → 2 parts)."""
  parts, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth = max(depth - 1, 0)
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def kv_pairs(text: str) -> dict[str, Any]:
  """Parses ``"a=1,b=0.9,c=true,name=x,sizes=(64,32)"`` into a dict of Python literals
  (commas inside brackets or quotes belong to the value)."""
  out: dict[str, Any] = {}
  for part in filter(None, (p.strip() for p in _top_level_split(text))):
    key, eq, value = part.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"expected key=value pairs, got {part!r}")
    v = value.strip()
    lowered = {"true": True, "false": False, "none": None}
    if v.lower() in lowered:
      out[key.strip()] = lowered[v.lower()]
      continue
    try:
      out[key.strip()] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[key.strip()] = v
  return out


#: The axes of a run's device mesh (:func:`parse_mesh`): ``data`` replicates the model and
#: splits the batch; ``fsdp`` splits the batch and shards the parameters and optimizer state.
MESH_AXES = ("data", "fsdp")

#: The floating-point types of ``param_dtype`` and ``dtype``.
DTYPES = ("float32", "bfloat16")


def parse_mesh(spec: str | Mapping[str, Any] | None) -> dict[str, int] | None:
  """``"data=2,fsdp=4"`` → ``{"data": 2, "fsdp": 4}``; ``"none"``, ``""`` or ``None`` → ``None``.

  A mapping is checked the same way. Axes are :data:`MESH_AXES`, each at most once, sizes
  positive integers; an axis left out has size 1.
  """
  if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
    return None
  if isinstance(spec, str):
    items: dict[str, Any] = {}
    for part in (p.strip() for p in spec.split(",")):
      if not part:
        continue
      key, eq, value = (t.strip() for t in part.partition("="))
      if not eq or not key:
        raise ValueError(f"mesh: expected AXIS=SIZE pairs such as data=4, got {part!r}.")
      if key in items:
        raise ValueError(f"mesh: axis {key!r} is given twice in {spec!r}.")
      items[key] = value
  elif isinstance(spec, Mapping):
    items = dict(spec)
  else:
    raise ValueError(f"mesh: expected 'data=N,fsdp=M' or a dict, got {type(spec).__name__}.")
  unknown = sorted(set(items) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axis {unknown}; the axes are {', '.join(MESH_AXES)}.")
  if not items:
    raise ValueError(f"mesh: no axis given in {spec!r}; e.g. data=4 or data=2,fsdp=2.")
  out = {}
  for key in MESH_AXES:
    if key not in items:
      continue
    value = items[key]
    try:
      size = value if isinstance(value, int) and not isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
      size = 0
    if isinstance(value, bool) or isinstance(value, float) or size < 1:
      raise ValueError(f"mesh: the size of axis {key!r} must be a positive integer, got {value!r}.")
    out[key] = size
  return out


def comma_list(text: str) -> list[str] | None:
  """``"params,grads"`` → ``["params", "grads"]``; empty → ``None``."""
  items = [t.strip() for t in text.split(",") if t.strip()]
  return items or None


# --------------------------------------------------------------------------- the schema

_GROUPS = (
  "model and data",
  "optimisation",
  "devices and precision",
  "metrics",
  "evaluation, checkpoints, output",
)


def _opt(
  default: Any = dataclasses.MISSING,
  *,
  help: str,
  group: str,
  flags: tuple[str, ...] = (),
  parse: Callable[[str], Any] | None = None,
  choices: tuple[str, ...] | None = None,
  switch: str | None = None,
  metavar: str | None = None,
  factory: Callable[[], Any] | None = None,
) -> Any:
  """A :class:`TrainConfig` field with its command-line spelling in ``metadata``.

  ``switch`` makes a boolean flag: ``"on"`` (``--flag`` sets ``True``) or ``"off"``
  (``--no-flag`` sets ``False``).
  """
  assert group in _GROUPS, group
  meta = {
    "help": help,
    "group": group,
    "flags": flags,
    "parse": parse,
    "choices": choices,
    "switch": switch,
    "metavar": metavar,
  }
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


_DATA, _OPTIM, _DEVICES, _METRICS, _OUT = _GROUPS


@dataclasses.dataclass
class TrainConfig:
  """What :func:`jaxscope.train.train` runs; every field is a ``jaxscope train`` flag
  (``--field-name`` unless its metadata names others) and a row of
  ``docs/train_options.md``."""

  model: str = _opt(
    "lenet5",
    group=_DATA,
    flags=("-m", "--model"),
    help="model name (jaxscope list-models), or module:attribute for a model factory of "
    "your own (jaxscope.models.external)",
  )
  dataset: str = _opt(
    "digits",
    group=_DATA,
    flags=("-d", "--dataset"),
    help="dataset (jaxscope list-datasets), or module:attribute for a loader of your own",
  )
  data_dir: str | None = _opt(
    None, group=_DATA, help="directory of dataset files (command line: default $JAXSCOPE_DATA)"
  )
  batch_size: int = _opt(
    64, group=_OPTIM, flags=("-b", "--batch-size"), parse=positive_int, help="training batch size"
  )
  epochs: int | None = _opt(
    10,
    group=_OPTIM,
    flags=("-e", "--epochs"),
    parse=positive_int,
    help="number of epochs (ignored when steps is given)",
  )
  steps: int | None = _opt(
    None, group=_OPTIM, parse=positive_int, help="total number of updates; overrides epochs"
  )
  optimizer: str = _opt(
    "momentum",
    group=_OPTIM,
    flags=("-o", "--optimizer"),
    help="momentum, nesterov, any optax alias (sgd, adam, adamw, rmsprop, …), or the "
    "probabilistic preconditioners preconditioned_sgd, adaptive_sgd, only_adaptive_sgd "
    "(step size estimated; --opt-args initial_lr=…, fixed_lr=…, est_rank=…)",
  )
  lr: float = _opt(
    0.05, group=_OPTIM, flags=("-l", "--lr", "--learning-rate"), parse=float, help="learning rate"
  )
  optimizer_args: dict[str, Any] = _opt(  # noqa: RUF009 (a field with metadata)
    group=_OPTIM,
    factory=dict,
    flags=("--opt-args",),
    parse=kv_pairs,
    metavar="K=V,…",
    help="extra keyword arguments of the optimizer, e.g. weight_decay=1e-4",
  )
  schedule: str = _opt(
    "constant",
    group=_OPTIM,
    help="constant | exponential:GAMMA (per epoch) | cosine | ratio (the optimizer at the "
    "constant lr followed by the update/weight-ratio adaptive rate, see ratio_*)",
  )
  ratio_target: float = _opt(
    1e-3, group=_OPTIM, parse=float, help="schedule ratio: the target update/weight ratio"
  )
  ratio_smoothing: float = _opt(
    0.9,
    group=_OPTIM,
    parse=float,
    help="schedule ratio: weight of the newest ratio in the moving average",
  )
  ratio_max_factor: float | None = _opt(
    500.0,
    group=_OPTIM,
    parse=optional_float,
    help="schedule ratio: cap of lr/base lr ('none': no cap)",
  )
  ratio_floor: float | None = _opt(
    None,
    group=_OPTIM,
    parse=optional_float,
    help="schedule ratio: floor of lr/base lr ('none': no floor)",
  )
  ratio_mode: str = _opt(
    "code",
    group=_OPTIM,
    choices=("code", "thesis"),
    help="schedule ratio: 'code' (the original implementation) or 'thesis' (eq. 3.7)",
  )
  metrics: str = _opt(
    "economy",
    group=_METRICS,
    help="economy | business | full | none | comma list of metric names (jaxscope "
    "list-metrics; no instruments). The presets are Cockpit's configurations: the per-layer "
    "scope (economy; full for full) plus Cockpit's instruments of the same name and the "
    "activation health of the captured layers",
  )
  topics: list[str] | None = _opt(  # noqa: RUF009 (a field with metadata)
    None,
    group=_METRICS,
    parse=comma_list,
    help="comma list of params,grads,updates (default all); topics, layers, exclude, depth "
    "and kind select the per-layer scope only",
  )
  layers: str | None = _opt(None, group=_METRICS, help="regex selecting layers by name")
  exclude: str | None = _opt(None, group=_METRICS, help="regex of layers to leave out")
  depth: int | None = _opt(
    None, group=_METRICS, parse=int, help="layer grouping depth (-1: per module)"
  )
  kind: str = _opt("any", group=_METRICS, choices=("any", "kernel", "bias"), help="leaves measured")
  every: int = _opt(1, group=_METRICS, parse=positive_int, help="measure every n-th step")
  eval_every: int | None = _opt(
    None,
    group=_OUT,
    parse=positive_int,
    help="steps between evaluations (default: once per epoch); also at step 0 and the end",
  )
  eval_batch_size: int = _opt(
    500, group=_OUT, parse=positive_int, help="batch size of the evaluation"
  )
  checkpoint_every: int | None = _opt(
    None,
    group=_OUT,
    parse=non_negative_int,
    help="steps between checkpoints (default: once per epoch; 0: only the first and the "
    "last); also at step 0 and the end",
  )
  max_to_keep: int | None = _opt(
    None,
    group=_OUT,
    parse=positive_int,
    help="checkpoints kept (default all, as the checkpoint analyses need the trajectory)",
  )
  out: str = _opt(
    "runs/default",
    group=_OUT,
    flags=("--out", "--log-dir"),
    help="run directory (command line: default runs/MODEL-DATASET-sSEED)",
  )
  tensorboard: bool = _opt(False, group=_OUT, switch="on", help="also write TensorBoard events")
  seed: int = _opt(
    0,
    group=_OPTIM,
    parse=non_negative_int,
    help="seed of the initialisation, data order and dropout",
  )
  quiet: bool = _opt(
    False, group=_OUT, flags=("-q", "--quiet"), switch="on", help="no progress bar or summary"
  )
  resume: bool = _opt(
    False,
    group=_OUT,
    switch="on",
    help="continue from the newest readable checkpoint in out; options not given on the "
    "command line are the run's own, and a change that alters training is refused unless "
    "--allow-changes",
  )
  allow_changes: bool = _opt(
    False,
    group=_OUT,
    switch="on",
    help="with --resume: accept options that alter training (optimizer, lr, schedule, seed, "
    "model, data, batch size); config.json then records each change with the step it applied "
    "from (config_history)",
  )
  overwrite: bool = _opt(
    False,
    group=_OUT,
    switch="on",
    help="start afresh in out, removing the run written there before (its log, config, "
    "checkpoints, plots, analyses and diagnosis; other files are left)",
  )
  live_diagnosis: bool = _opt(
    True,
    group=_OPTIM,
    switch="off",
    help="run the diagnosis rules at each evaluation and print each new critical finding "
    "once (warnings at the final evaluation)",
  )
  stop_on: str = _opt(
    "none",
    group=_OPTIM,
    choices=("none", "divergence"),
    help="divergence: stop the run when its loss is non-finite or above 10 x the first one, "
    "or before a step whose batch holds a non-finite training example; each step's record "
    "waits until its loss is read (one step behind: the device is not stalled), so no "
    "non-finite step is recorded (a stop/* record marks it); the command exits 1",
  )
  capacity: str | None = _opt(
    None,
    group=_OPTIM,
    help="dynamic capacity for capacity_mlp / capacity_cnn: chunks=5,patience=10,"
    "policy=all|activation-std (also cooldown, min_delta, smoothing; reinit=true|false: "
    "redraw a new chunk or keep its full-width init; reset=true|false: restart the detector "
    "after an expansion; keep=bias|new|output: what stays trainable). On a plateau of the "
    "moving-average training loss the next chunk of a layer is activated and the trained "
    "chunks are frozen; the cool-down also holds at the start; events are logged as "
    "capacity/expanded",
  )
  model_args: dict[str, Any] = _opt(  # noqa: RUF009 (a field with metadata)
    group=_DATA,
    factory=dict,
    parse=kv_pairs,
    metavar="K=V,…",
    help="extra keyword arguments of the model, e.g. depth=56",
  )
  data_args: dict[str, Any] = _opt(  # noqa: RUF009 (a field with metadata)
    group=_DATA, factory=dict, parse=kv_pairs, metavar="K=V,…", help="dataset loader kwargs"
  )
  mesh: dict[str, int] | None = _opt(  # noqa: RUF009 (a field with metadata)
    None,
    group=_DEVICES,
    parse=parse_mesh,
    metavar="AXIS=N,…",
    help="device mesh, e.g. data=4 (data parallel) or data=2,fsdp=2 (parameters and optimizer "
    "state sharded along fsdp); the sizes multiply to the number of devices (all processes). "
    "The batch is split over data×fsdp, so batch_size must be a multiple of it (the "
    "evaluation batch is rounded down to one). Default: one device, as without a mesh "
    "(docs/sharding.md)",
  )
  param_dtype: str = _opt(
    "float32",
    group=_DEVICES,
    choices=DTYPES,
    help="storage type of the parameters: the initial parameters are cast to it (floating "
    "leaves), so gradients, updates and the optimizer state follow; metrics are accumulated "
    "in float32 whatever it is",
  )
  dtype: str | None = _opt(
    None,
    group=_DEVICES,
    choices=DTYPES,
    help="compute type of the model, passed to the model builder as dtype= (models that take "
    "it, e.g. the transformers; others are refused); the loss is taken in float32. Default: "
    "the model's own",
  )
  xla_options: list[str] | None = _opt(  # noqa: RUF009 (a field with metadata)
    group=_DEVICES,
    factory=lambda: ["auto"],
    parse=comma_list,
    metavar="NAME,…",
    help="XLA:CPU options of the train step's program (jaxscope.xla.STEP_OPTIONS): "
    "fewer_copies (region-based copy insertion: no copies of the donated parameters around "
    "the instruments' branches; the MNIST MLP's business step 106 -> 84 ms, the 3c3d's "
    "temporaries larger) and lean_compile (XLA:CPU's elemental emitters: compiling takes "
    "half the memory; the 3c3d's steps faster, the MLP's instrument steps 1.1-1.25 x "
    "slower); none (XLA's own); auto (jaxscope.xla.step_options: lean_compile for a "
    "convolutional model, else fewer_copies with the Hessian trace or TIC instruments, else "
    "none; config.json's xla_step_options says which; README, XLA:CPU options per step)",
  )

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> TrainConfig:
    """The config of a run's ``config.json`` (derived and unknown keys are left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


# --------------------------------------------------------------------------- checks


def _positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
  if value is None and allow_none:
    return
  ok = isinstance(value, int) and not isinstance(value, bool)
  if not ok or value < (0 if allow_zero else 1):
    what = "a non-negative int" if allow_zero else "a positive int"
    raise ValueError(f"train: {name} must be {what}, got {value!r}.")


def check_config(config: TrainConfig) -> None:
  """Raises ``ValueError`` naming the field for values no run can take."""
  _positive("batch_size", config.batch_size)
  _positive("epochs", config.epochs, allow_none=True)
  _positive("steps", config.steps, allow_none=True)
  _positive("every", config.every)
  _positive("eval_every", config.eval_every, allow_none=True)
  _positive("eval_batch_size", config.eval_batch_size)
  _positive("checkpoint_every", config.checkpoint_every, allow_none=True, allow_zero=True)
  _positive("max_to_keep", config.max_to_keep, allow_none=True)
  _positive("seed", config.seed, allow_zero=True)
  if config.epochs is None and config.steps is None:
    raise ValueError("train: give epochs or steps.")
  _check_devices(config)
  if config.layers is not None:
    try:
      re.compile(config.layers)
    except re.error as e:
      raise ValueError(f"train: layers {config.layers!r} is not a valid regex: {e}") from None


def batch_split(mesh: Mapping[str, int] | None) -> int:
  """The number of parts a batch is split into on ``mesh`` (:func:`parse_mesh`'s dict):
  the product of its ``data`` and ``fsdp`` sizes (1 without a mesh)."""
  if not mesh:
    return 1
  return int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1))


def _check_devices(config: TrainConfig) -> None:
  """The mesh, the batch sizes it splits, the dtypes and the XLA options."""
  names = list(config.xla_options or ())
  if ("auto" in names or "none" in names) and len(names) > 1:
    raise ValueError(f"train: xla_options: 'auto' and 'none' stand alone, got {','.join(names)!r}.")
  try:
    compiler_options([n for n in names if n not in ("auto", "none")])
  except ValueError as e:
    raise ValueError(f"train: {e}; or 'auto' or 'none'.") from None
  try:
    mesh = parse_mesh(config.mesh)
  except ValueError as e:
    raise ValueError(f"train: {e}") from None
  parts = batch_split(mesh)
  if config.batch_size % parts:
    raise ValueError(
      f"train: batch_size {config.batch_size} is not a multiple of {parts}, the number of "
      f"parts the mesh {mesh} splits a batch into (data × fsdp)."
    )
  if config.param_dtype not in DTYPES:
    raise ValueError(f"train: param_dtype must be one of {DTYPES}, got {config.param_dtype!r}.")
  if config.dtype is not None and config.dtype not in DTYPES:
    raise ValueError(f"train: dtype must be None or one of {DTYPES}, got {config.dtype!r}.")


# --------------------------------------------------------------------------- config.json

#: Keys of ``config.json`` besides the :class:`TrainConfig` fields, written by the loop.
DERIVED_KEYS: dict[str, str] = {
  "versions": "library versions and the JAX backend",
  "task": "classification or regression (the dataset's)",
  "steps_per_epoch": "training examples // batch_size",
  "total_steps": "the number of updates the run was configured for",
  "input_shape": "one example's shape (the model is rebuilt for it)",
  "num_classes": "the dataset's number of classes (outputs)",
  "optimizer_hparams": "optimizer_args with the optimizer's defaults filled in",
  "device_count": "devices the run's state and batches are placed on (1 without a mesh)",
  "process_count": "JAX processes (hosts) taking part in the run",
  "data_stats": "the training split's input scale, non-finite entries and class balance "
  "(jaxscope.data.data_stats), which the diagnoses read",
  "xla_step_options": "the XLA:CPU options the train step was compiled with (xla_options "
  "resolved; 'auto' by jaxscope.xla.step_options)",
  "config_history": "one entry per resume that changed the config: the first step computed "
  "with the new values, the time, and each changed field's old and new value "
  "(jaxscope.run.resume)",
}

#: Keys of the config that must agree when resuming (the others may change). ``param_dtype``
#: is one (the saved parameters and optimizer state are stored in it); ``mesh`` and ``dtype``
#: may change: a checkpoint is restored into the new run's layout (orbax reshards it), and
#: the state does not depend on the compute type.
RESUME_KEYS = (
  "model",
  "dataset",
  "batch_size",
  "optimizer",
  "optimizer_args",
  "seed",
  "capacity",
  "param_dtype",
)


def config_record(config: TrainConfig, **derived: Any) -> dict[str, Any]:
  """What ``config.json`` holds: the fields of ``config`` and the ``derived`` keys (names
  from :data:`DERIVED_KEYS`), with ``optimizer_hparams`` filled in."""
  unknown = sorted(set(derived) - set(DERIVED_KEYS))
  if unknown:
    raise ValueError(f"config_record: unknown derived keys {unknown}; known: {list(DERIVED_KEYS)}.")
  out = dataclasses.asdict(config)
  out["optimizer_hparams"] = optimizer_hparams(config.optimizer, config.optimizer_args)
  out.update(derived)
  return out
