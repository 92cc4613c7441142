"""Read the orbax checkpoints of a training run (jaxscope's, or your own loop's).

:func:`jaxscope.train.train` writes an orbax checkpoint at step 0, every
``checkpoint_every`` steps and at the end (see :mod:`jaxscope.train`); each one holds the
whole :class:`~jaxscope.train.TrainState` (item ``state``) and a JSON record (item
``meta``: ``step``, ``epoch``, ``wall_time``, ``eval_loss``, ``eval_accuracy``).
:class:`RunCheckpoints` opens them **read-only** for the analyses that walk a trajectory
(interpolation, landscapes, PCA of the path): it restores only ``params`` and
``model_state`` (never the optimizer state, so no optimizer has to be built), takes the
shapes from the checkpoint's own metadata, streams one leaf at a time for models too large
to hold twice, and skips damaged steps with a warning.

It reads the checkpoints of a loop of your own as well: any orbax ``CheckpointManager``
directory whose items hold a params tree (an unnamed item ``default``, a flax
``TrainState`` saved whole, params saved as the item, ...); :class:`CheckpointLayout` says
where the parameters are, found by itself or given (``item=``, ``params_key=``). The
layouts are described in ``docs/checkpoints.md``.

>>> import tempfile
>>> from jaxscope.checkpoint import RunCheckpoints
>>> from jaxscope.train import train
>>> run = train(model="mlp", dataset="digits", steps=2, checkpoint_every=1, metrics="none",
...             out=tempfile.mkdtemp(), quiet=True)
>>> with RunCheckpoints(run.run_dir) as ckpts:
...   print(ckpts.steps)
...   last = ckpts.restore(2)
...   print(sorted(last.params), last.model_state, last.meta["step"])
...   print([name for name, _ in ckpts.leaves(0)][:2])
[0, 1, 2]
['fc1', 'fc2', 'out'] {} 2
['fc1/bias', 'fc1/kernel']
"""

from jaxscope.checkpoint.layout import CHECKPOINT_DIR, CheckpointLayout, CheckpointLayoutError
from jaxscope.checkpoint.reader import Checkpoint, DamagedCheckpointWarning, RunCheckpoints
from jaxscope.checkpoint.writer import CheckpointWriter

__all__ = [
  "CHECKPOINT_DIR",
  "Checkpoint",
  "CheckpointLayout",
  "CheckpointLayoutError",
  "CheckpointWriter",
  "DamagedCheckpointWarning",
  "RunCheckpoints",
]
