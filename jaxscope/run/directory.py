"""The run directory: its layout, and :class:`Run`, a run loaded back from disk.

A run directory is written by the reference loop (:func:`jaxscope.train.train`,
``jaxscope train``) and read by every analysis, diagnosis and plot::

    RUN/config.json        the configuration (TrainConfig fields + derived keys), strict JSON
    RUN/metrics.jsonl      one JSON line per recorded step (jaxscope.record)
    RUN/checkpoints/       orbax checkpoints: state (params, model_state, …) + meta
    RUN/tensorboard/       TensorBoard events, when asked for
    RUN/plots/             PNG figures of the metrics (jaxscope plot)
    RUN/analysis/          checkpoint analyses: NAME.npz, NAME.json, figures (jaxscope analyze)
    RUN/diagnosis.json     findings of the diagnosis rules (jaxscope diagnose)
    RUN/diagnosis.png      the metrics behind each finding

:class:`RunLayout` names these paths once; :func:`load_run` opens a run as a :class:`Run`
with its config, :class:`~jaxscope.record.History`, checkpoints and the model and dataset
rebuilt from the config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jaxscope.checkpoint import CHECKPOINT_DIR, RunCheckpoints
from jaxscope.record import CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, History, read_json
from jaxscope.run.config import TrainConfig, batch_split, optimizer_hparams, parse_mesh

__all__ = ["Run", "RunLayout", "load_run", "read_config"]


class RunLayout(NamedTuple):
  """The paths of one run directory (see the module docstring)."""

  root: Path

  @property
  def config(self) -> Path:
    return self.root / CONFIG_FILE

  @property
  def metrics(self) -> Path:
    return self.root / METRICS_FILE

  @property
  def checkpoints(self) -> Path:
    return self.root / CHECKPOINT_DIR

  @property
  def tensorboard(self) -> Path:
    return self.root / TENSORBOARD_DIR

  @property
  def plots(self) -> Path:
    return self.root / "plots"

  @property
  def analysis(self) -> Path:
    return self.root / "analysis"

  @property
  def diagnosis(self) -> Path:
    return self.root / "diagnosis.json"

  @property
  def diagnosis_figure(self) -> Path:
    return self.root / "diagnosis.png"

  @property
  def lock(self) -> Path:
    """The lock file of a run being trained (:mod:`jaxscope.run.lock`)."""
    return self.root / ".lock"

  @property
  def damaged_checkpoints(self) -> Path:
    """Where damaged checkpoints are moved aside on resume (kept, never deleted)."""
    return self.root / "damaged-checkpoints"

  def holds_run(self) -> bool:
    """Whether a run was written here (a metrics log or any checkpoint)."""
    return self.metrics.exists() or any(self.checkpoints.glob("*"))


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
  """A run's ``config.json`` as a dict (``{}`` when the run has none), with the keys that
  earlier versions did not write filled in (``optimizer_hparams``)."""
  file = RunLayout(Path(path)).config
  if not file.is_file():
    return {}
  config = read_json(file)
  if not isinstance(config, dict):
    raise ValueError(f"{file} does not hold a JSON object.")
  if "optimizer" in config and "optimizer_hparams" not in config:
    config["optimizer_hparams"] = optimizer_hparams(
      config["optimizer"], config.get("optimizer_args")
    )
  return config


class Run:
  """A run directory loaded back (:func:`load_run`): what it was configured with, what it
  recorded, its checkpoints, and the model and data rebuilt from the config (or given to
  :func:`load_run`, for the checkpoints of a loop of your own).

  Everything but :attr:`config` is read on first use and cached. Close it (or use it as a
  context manager) to release the checkpoint reader.

  A run trained on a device mesh (``--mesh``, ``config.json``'s ``mesh``) is read back in
  its own layout: :attr:`mesh` is the run's mesh rebuilt on the devices present (when there
  are enough of them), and :attr:`checkpoints` restores every checkpoint onto it with the
  run's partition rule (:mod:`jaxscope.run.mesh`), so the analyses compute on the sharded
  parameters as the training did, each device holding its shards.

  Attributes:
    path: the run directory.
    layout: its :class:`RunLayout`.
    config: ``config.json`` as a dict, with the ``model``, ``dataset``, ``model_args`` and
      ``task`` given to :func:`load_run` in place of its own (``{}`` when there is neither).
  """

  def __init__(
    self,
    path: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    mesh: Any = "auto",
    model: Any = None,
    dataset: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    task: str | None = None,
    item: str | None = None,
    params_key: str | None = None,
    model_state_key: str | None = None,
  ) -> None:
    from jaxscope.run.own import model_name

    self.path = Path(path)
    if not self.path.is_dir():
      raise ValueError(f"load_run: run directory {self.path} does not exist.")
    if task not in (None, "classification", "regression"):
      raise ValueError(f"load_run: task must be 'classification' or 'regression', got {task!r}.")
    if model_args is not None and not isinstance(model_args, Mapping):
      raise ValueError(f"load_run: model_args must be a dict, got {model_args!r}.")
    if dataset is not None and not isinstance(dataset, str):
      raise ValueError(f"load_run: dataset must be a dataset name, got {dataset!r}.")
    self.layout = RunLayout(self.path)
    self._recorded = read_config(self.path)
    given = {"model": None if model is None else model_name(model), "dataset": dataset}
    given |= {"model_args": None if model_args is None else dict(model_args), "task": task}
    self.config: dict[str, Any] = {
      **self._recorded,
      **{k: v for k, v in given.items() if v is not None},
    }
    self._given = {"model": model, "dataset": dataset, "model_args": model_args}
    self._layout_options = {"item": item, "params_key": params_key}
    self._layout_options["model_state_key"] = model_state_key
    self._data_dir = data_dir
    self._mesh_spec = mesh
    self._mesh: Any = _UNSET
    self._history: History | None = None
    self._checkpoints: RunCheckpoints | None = None
    self._dataset: Any = None
    self._model: Any = None

  def __repr__(self) -> str:
    return f"Run({str(self.path)!r}, model={self.config.get('model')!r})"

  def __enter__(self) -> Run:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def close(self) -> None:
    """Closes the checkpoint reader, if it was opened (idempotent)."""
    if self._checkpoints is not None:
      self._checkpoints.close()
      self._checkpoints = None

  @property
  def train_config(self) -> TrainConfig:
    """``config.json`` as a :class:`~jaxscope.train.TrainConfig` (derived keys left out)."""
    if "model" not in self._recorded:
      self._need("model")
    return TrainConfig.from_record(self._recorded)

  @property
  def history(self) -> History:
    """The recorded metrics (``metrics.jsonl``), with the config."""
    if self._history is None:
      self._history = History.load(self.path)
    return self._history

  @property
  def mesh(self) -> Any:
    """The device mesh the checkpoints are restored onto (a :class:`jax.sharding.Mesh`), or
    ``None``: the first device.

    By default (``load_run(path, mesh="auto")``) the run's own mesh on the first
    ``data × fsdp`` devices present (:func:`jaxscope.run.mesh.run_mesh`), ``None`` for a
    one-device run or when fewer devices are present than the run trained on.
    """
    if self._mesh is _UNSET:
      from jaxscope.run import mesh as run_mesh

      spec = self._mesh_spec
      if isinstance(spec, str) and spec == "auto":
        self._mesh = run_mesh.run_mesh(self.config.get("mesh"))
      elif spec is None or isinstance(spec, jax.sharding.Mesh):
        self._mesh = spec
      else:
        sizes = parse_mesh(spec)  # "none" → one device
        need = batch_split(sizes)
        self._mesh = None if sizes is None else run_mesh.make_mesh(sizes, jax.devices()[:need])
    return self._mesh

  @property
  def checkpoints(self) -> RunCheckpoints:
    """The checkpoints, opened read-only (:class:`~jaxscope.checkpoint.RunCheckpoints`);
    on :attr:`mesh`, when there is one, in the run's layout (its
    :func:`~jaxscope.run.mesh.checkpoint_sharding`)."""
    if self._checkpoints is None:
      from jaxscope.run.mesh import checkpoint_sharding

      mesh = self.mesh
      rule = None if mesh is None else checkpoint_sharding(mesh)
      self._checkpoints = RunCheckpoints(self.path, sharding=rule, **self._layout_options)
    return self._checkpoints

  @property
  def task(self) -> str:
    """``"classification"`` or ``"regression"`` (the config's, else the dataset's)."""
    return self.config.get("task") or getattr(self.dataset, "task", "classification")

  @property
  def dataset(self) -> Any:
    """The run's dataset as it trained on it (:func:`jaxscope.data.load` of the config's
    ``dataset``, ``data_dir`` (or :func:`load_run`'s ``data_dir``) and ``data_args``), or
    the ``dataset`` given to :func:`load_run` (the config's ``data_args`` only when it
    names the same one).

    Raises:
      ValueError: the run has no ``config.json`` (or it names no dataset) and
        :func:`load_run` was given none.
    """
    if self._dataset is None:
      config = self._need("dataset")
      from jaxscope import data as jdata

      where = self._data_dir
      if where is None and not _embedded(jdata, config["dataset"]):
        where = config.get("data_dir")  # An embedded set reads no files: no warning.
      same = self._recorded.get("dataset") == config["dataset"]
      args = config.get("data_args", {}) if same else {}
      self._dataset = jdata.load(config["dataset"], where, **args)
    return self._dataset

  @property
  def model(self) -> Any:
    """The run's model, a :class:`jaxscope.models.ModelDef` rebuilt from the config
    (``models.build(model, input_shape, num_classes, **model_args)``; the shape and class
    count come from the config when recorded, else from :attr:`dataset`), or built from
    the ``model`` given to :func:`load_run` for :attr:`dataset`'s shapes
    (:func:`jaxscope.run.own.build_model`: a zoo name, ``"module:attribute"`` naming a
    Linen module, class or factory, or such an object).

    Raises:
      ValueError: the run has no ``config.json`` (or it names no model) and
        :func:`load_run` was given none, or the given model cannot be built (the message
        names ``model`` and why).
    """
    if self._model is None and self._given["model"] is not None:
      from jaxscope.run.own import build_model

      same = self._recorded.get("model") == self.config["model"]
      args = self._given["model_args"]
      if args is None:
        args = self._recorded.get("model_args", {}) if same else {}
      ds = self.dataset
      self._model = build_model(self._given["model"], ds.train_x.shape[1:], ds.num_classes, args)
    if self._model is None:
      config = self._need("model")
      from jaxscope import models as jmodels

      input_shape, num_classes = config.get("input_shape"), config.get("num_classes")
      if input_shape is None or num_classes is None:
        ds = self.dataset
        input_shape = ds.train_x.shape[1:] if input_shape is None else input_shape
        num_classes = ds.num_classes if num_classes is None else num_classes
      self._model = jmodels.build(
        config["model"], tuple(input_shape), int(num_classes), **config.get("model_args", {})
      )
    return self._model

  def _need(self, key: str) -> dict[str, Any]:
    if key not in self.config:
      how = {
        "model": "model= (a zoo name or 'module:attribute'; jaxscope analyze --model)",
        "dataset": "dataset= (a dataset name, see jaxscope list-datasets; jaxscope analyze "
        "--dataset)",
      }[key]
      raise ValueError(
        f"load_run: {self.layout.config} is missing or names no {key}; for the "
        f"checkpoints of a loop of your own, pass {how}."
      )
    return self.config


def load_run(
  path: str | os.PathLike[str],
  *,
  data_dir: str | None = None,
  mesh: Any = "auto",
  model: Any = None,
  dataset: str | None = None,
  params_key: str | None = None,
  item: str | None = None,
  task: str | None = None,
  model_args: Mapping[str, Any] | None = None,
  model_state_key: str | None = None,
) -> Run:
  """Opens the run directory ``path`` (see :class:`Run`).

  A directory of orbax checkpoints written by a loop of your own has no ``config.json``:
  say which model and dataset it is with ``model`` and ``dataset``, and, when the
  checkpoints do not keep the params at ``params`` of their only item, where they are
  (``params_key``, ``item``; see :class:`~jaxscope.checkpoint.RunCheckpoints` and
  ``docs/checkpoints.md``). Given to a jaxscope run, ``model`` and ``dataset`` replace
  the config's.

  Args:
    path: a run directory written by ``jaxscope train`` / :func:`jaxscope.train.train`
      (or any directory with a ``config.json``, ``metrics.jsonl`` or ``checkpoints/``),
      or the directory of an orbax ``CheckpointManager``.
    data_dir: where the dataset's files are now, when they moved since training.
    mesh: where the checkpoints are restored (:attr:`Run.mesh`): ``"auto"`` (the run's
      own mesh when it trained on one and enough devices are present, else the first
      device), ``None`` (the first device), a mesh spec such as ``"data=1,fsdp=4"`` (the
      run's partition rule on the first ``data × fsdp`` devices) or a
      :class:`jax.sharding.Mesh` with the axes ``("data", "fsdp")``.
    model: the model (:attr:`Run.model`): a zoo name, or ``"module:attribute"`` naming a
      ``flax.linen.Module`` instance, a Module class (instantiated with ``model_args``), a
      factory returning one of those or a :class:`~jaxscope.models.ModelDef` (see
      :mod:`jaxscope.run.own`); from Python also such an object itself.
    dataset: a dataset name of :func:`jaxscope.data.load` (or ``"module:attribute"``).
    params_key: the ``/``-separated path of the params in the checkpoint item (default
      ``"params"``; ``""``: the item is the params tree).
    item: the orbax item holding them (default: ``"state"``, else the only item).
    task: ``"classification"`` or ``"regression"`` (default: the config's, else the
      dataset's).
    model_args: keyword arguments of the model's class, factory or zoo entry.
    model_state_key: the path of the non-params collections (default: ``model_state``
      or ``batch_stats`` beside the params; ``"none"``: none).

  Raises:
    ValueError: ``path`` is not a directory, ``task``, ``model_args`` or ``dataset`` is
      not of the kind expected, or ``mesh`` is not a mesh spec (when the checkpoints are
      first opened). The model, dataset and checkpoints are opened on first use; their
      errors name ``model``, ``dataset``, ``params_key`` or ``item``.

  Example:
    >>> import tempfile
    >>> import jaxscope
    >>> from jaxscope.train import train
    >>> out = tempfile.mkdtemp()
    >>> _ = train(model="mlp", dataset="sine", steps=4, batch_size=32, metrics="none",
    ...           out=out, quiet=True)
    >>> with jaxscope.load_run(out) as run:
    ...   print(run.config["model"], run.task, run.checkpoints.steps)
    ...   print(run.history.steps("loss").tolist())
    mlp regression [0, 4]
    [0, 1, 2, 3]
  """
  options = {"model": model, "dataset": dataset, "model_args": model_args, "task": task}
  layout = {"item": item, "params_key": params_key, "model_state_key": model_state_key}
  return Run(path, data_dir=data_dir, mesh=mesh, **options, **layout)


_UNSET = object()


def _embedded(jdata: Any, name: str) -> bool:
  """Whether the dataset ``name`` is embedded (``False`` for one of one's own)."""
  try:
    return bool(jdata.embedded(name))
  except (KeyError, ValueError):
    return False
