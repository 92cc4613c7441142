"""optax transformations that see and act on what they measure."""

from jaxscope.transforms.monitor import MonitorState, metrics, monitored

__all__ = ["MonitorState", "metrics", "monitored"]
