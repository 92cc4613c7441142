"""The one owner of a run directory: its layout, the config schema, and :func:`load_run`.

A run directory is what ``jaxscope train`` (:func:`jaxscope.train.train`) writes and what
``jaxscope plot``, ``analyze`` and ``diagnose`` read (layout: :mod:`jaxscope.run.directory`).
:class:`TrainConfig` (:mod:`jaxscope.run.config`) is the schema of its ``config.json``,
and the source of ``jaxscope train``'s flags and of ``docs/train_options.md``.

Layers: ``run`` sits above the host layer (record, checkpoint, analysis, diagnose, plot)
and the model zoo and datasets, which it uses to rebuild a run's model and data; the
reference loop and the command line sit above it.

Example:
  >>> import jaxscope
  >>> jaxscope.load_run  # doctest: +ELLIPSIS
  <function load_run at ...>
"""

from jaxscope.run.config import (
  CAPACITY_DEFAULTS,
  DERIVED_KEYS,
  OPTIMIZER_DEFAULTS,
  RESUME_KEYS,
  TrainConfig,
  check_config,
  config_record,
  optimizer_hparams,
  parse_capacity,
)
from jaxscope.run.directory import Run, RunLayout, load_run, read_config
from jaxscope.run.options import CliOption, cli_options, options_markdown
from jaxscope.run.resume import check_resume

__all__ = [
  "CAPACITY_DEFAULTS",
  "DERIVED_KEYS",
  "OPTIMIZER_DEFAULTS",
  "RESUME_KEYS",
  "CliOption",
  "Run",
  "RunLayout",
  "TrainConfig",
  "check_config",
  "check_resume",
  "cli_options",
  "config_record",
  "load_run",
  "optimizer_hparams",
  "options_markdown",
  "parse_capacity",
  "read_config",
]
