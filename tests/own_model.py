"""A model of "your own" for tests/test_own_checkpoints.py: a plain Flax Linen MLP that
jaxscope knows nothing about, named ``own_model:MLP`` (or built by ``own_model:make_mlp``)
on the command line."""

from __future__ import annotations

import flax.linen as nn
import jax

NOT_A_MODEL = 3
"""Something ``--model own_model:NOT_A_MODEL`` must refuse."""


class MLP(nn.Module):
  """Flatten, one hidden ReLU layer, ``classes`` logits; ``__call__(x)`` takes no flag."""

  hidden: int = 16
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))  # Dense_0
    return nn.Dense(self.classes)(hidden)  # Dense_1


def make_mlp(hidden: int = 16) -> MLP:
  """A factory of the kind a training script keeps next to its model."""
  return MLP(hidden=hidden)
