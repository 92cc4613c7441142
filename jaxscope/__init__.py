"""jaxscope: live introspection of neural-network training in JAX.

Layers (imports only point downwards; docs/architecture.md): ``tree``, ``packed`` (base)
→ ``metrics``, ``transforms``, ``capture`` (device side) → ``record``, ``checkpoint``,
``analysis``, ``diagnose``, ``plot`` (host side) → ``models``, ``data`` → ``run`` (the run
directory's owner: :func:`load_run`) → ``train`` (the reference loop) and ``cli`` (app).
"""

# First, while no JAX backend runs: XLA:CPU's memory-minimising scheduler and the release of
# freed compiler memory (jaxscope/xla.py; JAXSCOPE_XLA_DEFAULTS=0 leaves both alone).
from jaxscope import xla

xla.apply_defaults()

from jaxscope import capture, metrics, packed, record, transforms, tree  # noqa: E402
from jaxscope.metrics import scope  # noqa: E402
from jaxscope.packed import PackedValues  # noqa: E402
from jaxscope.record import History, Recorder  # noqa: E402
from jaxscope.run import Run, load_run  # noqa: E402
from jaxscope.transforms import monitored  # noqa: E402

# jaxscope.plot (matplotlib) and jaxscope.data (scikit-learn) are imported on demand;
# diagnoses: `from jaxscope.diagnose import diagnose` (not re-exported: the function
# would shadow the module `jaxscope.diagnose`).

__version__ = "0.1.0"

__all__ = [
  "History",
  "PackedValues",
  "Recorder",
  "Run",
  "__version__",
  "capture",
  "load_run",
  "metrics",
  "monitored",
  "packed",
  "record",
  "scope",
  "transforms",
  "tree",
  "xla",
]
