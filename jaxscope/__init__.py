"""jaxscope: live introspection of neural-network training in JAX.

Layers (imports only point downwards; docs/architecture.md): ``tree`` (base) → ``metrics``,
``transforms``, ``capture`` (device side) → ``record``, ``checkpoint``, ``analysis``,
``diagnose``, ``plot`` (host side) → ``models``, ``data`` → ``run`` (the run directory's
owner: :func:`load_run`) → ``train`` (the reference loop) and ``cli`` (app).
"""

from jaxscope import capture, metrics, record, transforms, tree
from jaxscope.metrics import scope
from jaxscope.record import History, Recorder
from jaxscope.run import Run, load_run
from jaxscope.transforms import monitored

# jaxscope.plot (matplotlib) and jaxscope.data (scikit-learn) are imported on demand;
# diagnoses: `from jaxscope.diagnose import diagnose` (not re-exported: the function
# would shadow the module `jaxscope.diagnose`).

__version__ = "0.1.0"

__all__ = [
  "History",
  "Recorder",
  "Run",
  "__version__",
  "capture",
  "load_run",
  "metrics",
  "monitored",
  "record",
  "scope",
  "transforms",
  "tree",
]
