"""Writing metrics to a run directory without stalling the train step, and reading them back.

The host side of jaxscope's records: :class:`Recorder` (:mod:`.recorder`), :class:`History`
(:mod:`.history`) and the one JSON convention of every file jaxscope writes (:mod:`.jsonio`).

:class:`Recorder` appends one JSON line per step to ``run_dir/metrics.jsonl`` (and,
optionally, TensorBoard events to ``run_dir/tensorboard``); :class:`History` loads a
run directory back into numpy arrays.

A jitted train step returns as soon as it is *dispatched*; reading its outputs on the
host (``float(x)``, ``np.asarray(x)``, ``jax.device_get``) waits until the device has
finished it, which leaves the device idle while the host prepares the next step. The
recorder therefore never reads the values it is given now: it keeps them and transfers
the values of step ``k`` (one ``jax.device_get`` for a whole batch) only after the
values of step ``k + 1`` were handed to :meth:`Recorder.write`, that is after step
``k + 1`` was dispatched, so the device always has work queued while the host waits.
At the time of the write, each array's device-to-host copy is started asynchronously
(``copy_to_host_async``), so the later transfer usually finds the data already there.

Values must stay valid until they are transferred: return the metrics from the jitted
step (outputs are fresh buffers). Do not hand the recorder arrays that the next step
*donates* (``donate_argnums``), e.g. ``transforms.monitored_metrics(opt_state)`` read outside
``jit`` from a state that is then donated; the recorder raises a clear error if it
finds a deleted array.

File format: each line of ``metrics.jsonl`` is ``{"step": int, "values": {key: value}}``
with floats, ints, bools and (nested) lists of them, e.g. histogram counts and edges.
The file is strict JSON Lines: NaN and ±Inf are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``, the one convention of every JSON file jaxscope writes
(:mod:`jaxscope.record.jsonio`: :func:`dumps`, :func:`loads`); :meth:`History.load` reads
them back as floats, and reads the bare ``NaN``/``Infinity`` tokens of earlier versions.
Steps whose ``"measured"`` flag is false (scopes with ``every=n`` repeat old
values on unmeasured steps) are not written, and the flag itself is never stored.

Scanned loops: the values of ``T`` steps stacked on a leading axis (the outputs of a
``lax.scan`` over the train step, ``"measured"`` of shape ``[T]``) go to
:meth:`Recorder.write_stacked` with their steps (an int ``start`` or ``T`` increasing
ints); it writes exactly the lines ``T`` calls of :meth:`Recorder.write` would, one per
measured row, with the same deferred transfer (one stacked write is one entry towards
``transfer_every``). :meth:`Recorder.write` refuses a non-scalar ``"measured"``.

Multi-host: only process 0 (``jax.process_index() == 0``) writes. On other processes a
recorder creates nothing, and ``write``, ``flush`` and ``close`` do nothing; arrays
given to ``write`` must then be fully addressable on process 0 (replicated metrics,
as a scope produces from replicated or sharded parameters).

Example:
  >>> import tempfile
  >>> import jax, jax.numpy as jnp, optax
  >>> from jaxscope import metrics, transforms
  >>> from jaxscope.record import History, Recorder
  >>> params = {"w": jnp.ones((3, 2))}
  >>> tx = transforms.monitored(optax.sgd(0.1), metrics.scope(params=["norm"]))
  >>> opt_state = tx.init(params)
  >>> @jax.jit
  ... def train_step(params, opt_state):
  ...   loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  ...   updates, opt_state = tx.update(grads, opt_state, params)
  ...   params = optax.apply_updates(params, updates)
  ...   return params, opt_state, transforms.monitored_metrics(opt_state) | {"loss": loss}
  >>> run_dir = tempfile.mkdtemp()
  >>> with Recorder(run_dir, config={"lr": 0.1}) as rec:
  ...   for step in range(3):
  ...     params, opt_state, values = train_step(params, opt_state)
  ...     rec.write(step, values)
  >>> history = History.load(run_dir)
  >>> history.keys()
  ['params/norm/w', 'loss']
  >>> history.steps("loss").tolist()
  [0, 1, 2]
  >>> history["loss"].round(3).tolist()
  [6.0, 3.84, 2.458]
  >>> history.config
  {'lr': 0.1}
"""

from jaxscope.record.history import History
from jaxscope.record.jsonio import (
  NON_FINITE,
  dumps,
  dumps_line,
  from_jsonable,
  loads,
  read_json,
  to_jsonable,
  write_atomic,
  write_json,
)
from jaxscope.record.recorder import CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, Recorder

__all__ = [
  "CONFIG_FILE",
  "METRICS_FILE",
  "NON_FINITE",
  "TENSORBOARD_DIR",
  "History",
  "Recorder",
  "dumps",
  "dumps_line",
  "from_jsonable",
  "loads",
  "read_json",
  "to_jsonable",
  "write_atomic",
  "write_json",
]
