"""jaxscope: live introspection of neural-network training in JAX.

Layers (imports only point downwards): ``tree`` (base) → ``metrics``, ``transforms``,
``capture`` (device side) → ``record``, ``plot`` (host side) → ``data`` and examples (app).
"""

from jaxscope import capture, metrics, record, transforms, tree
from jaxscope.metrics import scope
from jaxscope.record import History, Recorder
from jaxscope.transforms import monitored

# jaxscope.plot (matplotlib) and jaxscope.data (scikit-learn) are imported on demand;
# diagnoses: `from jaxscope.diagnose import diagnose` (not re-exported: the function
# would shadow the module `jaxscope.diagnose`).

__version__ = "0.1.0"

__all__ = [
  "History",
  "Recorder",
  "__version__",
  "capture",
  "metrics",
  "monitored",
  "record",
  "scope",
  "transforms",
  "tree",
]
