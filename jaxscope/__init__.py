"""jaxscope: live introspection of neural-network training in JAX.

Layers (imports only point downwards): ``tree`` (base) → ``metrics``, ``transforms``
(device side) → ``record``, ``plot`` (host side) → ``data`` and examples (app).
"""

from jaxscope import metrics, transforms, tree
from jaxscope.metrics import scope
from jaxscope.transforms import monitored

__version__ = "0.1.0"

__all__ = ["__version__", "metrics", "monitored", "scope", "transforms", "tree"]
