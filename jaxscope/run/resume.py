"""Resuming a run: what may change between the run's ``config.json`` and a new command."""

from __future__ import annotations

from jaxscope.run.config import RESUME_KEYS, TrainConfig
from jaxscope.run.directory import RunLayout, read_config

__all__ = ["check_resume"]


def check_resume(layout: RunLayout, config: TrainConfig) -> None:
  """Checks that ``config`` may write into ``layout``: a directory that already holds a
  run needs ``config.resume``, and a resumed run must agree with the recorded config on
  :data:`~jaxscope.run.config.RESUME_KEYS`.

  Raises:
    ValueError: naming the directory, or the key and both values.
  """
  if layout.holds_run() and not config.resume:
    raise ValueError(
      f"train: {layout.root} already holds a run; pass resume=True (--resume) to continue it, "
      "or choose another output directory (--out)."
    )
  if config.resume and layout.config.exists():
    old = read_config(layout.root)
    for key in RESUME_KEYS:
      if key in old and old[key] != getattr(config, key):
        raise ValueError(
          f"train(resume=True): {key}={getattr(config, key)!r} differs from the run's "
          f"{old[key]!r} in {layout.config}."
        )
