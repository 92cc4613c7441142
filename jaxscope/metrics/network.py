"""Network-level metrics: the loss and the accuracy of the current batch.

These are not per-layer: a scope stores them under plain keys (``loss``,
``accuracy``). Their inputs are the ``loss=``, ``logits=`` and ``labels=`` arguments
of :meth:`Scope.update` (``value=``, ``logits=``, ``labels=`` extra arguments through
:func:`~jaxscope.transforms.monitored`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["NetworkMetric", "accuracy", "batch_accuracy", "loss"]


class NetworkMetric(NamedTuple):
  """A network-level statistic ``fn(loss=..., logits=..., labels=...) -> scalar``."""

  name: str
  fn: Callable[..., jax.Array]
  needs: tuple[str, ...]
  """Which of ``loss``, ``logits``, ``labels`` must be given."""


def batch_accuracy(
  logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Top-1 accuracy: ``(1/Σ mᵢ) Σᵢ mᵢ · [argmax_c logits_{i,c} = yᵢ]``.

  Args:
    logits: ``[..., classes]``.
    labels: integer class ids ``[...]``, or one-hot / probability vectors
      ``[..., classes]`` (their argmax is the label).
    mask: optional ``[...]`` weights (1 for real examples, 0 for padding).

  Returns:
    A ``float32`` scalar; ``0`` for an all-zero mask.
  """
  if labels.ndim == logits.ndim:
    labels = jnp.argmax(labels, axis=-1)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
      f"accuracy: labels of shape {labels.shape} do not match logits {logits.shape} "
      "(expected labels [...] or one-hot [..., classes])."
    )
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  if mask is None:
    return jnp.mean(hits)
  m = mask.astype(jnp.float32)
  return jnp.sum(hits * m) / jnp.maximum(jnp.sum(m), 1.0)


def loss() -> NetworkMetric:
  """The batch loss as given (``loss=``, or optax's ``value=``), stored as ``loss``."""
  return NetworkMetric("loss", lambda loss, **_: jnp.asarray(loss, jnp.float32), ("loss",))


def accuracy() -> NetworkMetric:
  """Top-1 accuracy of ``logits`` against ``labels`` (:func:`batch_accuracy`)."""
  return NetworkMetric(
    "accuracy", lambda logits, labels, **_: batch_accuracy(logits, labels), ("logits", "labels")
  )
