"""The model zoo: Flax models that adapt to the input shape and class count.

Every model is built by name for one input shape (without the batch axis) and number of
classes, and is handed out as a :class:`ModelDef` with pure ``init`` and ``apply``
functions, whether it is written with Flax Linen or Flax NNX:

>>> import jax, jax.numpy as jnp
>>> from jaxscope import models
>>> model = models.build('lenet5', (8, 8, 1), num_classes=10)
>>> x = jnp.zeros((4, 8, 8, 1))
>>> variables = model.init(jax.random.key(0), x)
>>> sorted(variables['params'])
['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
>>> logits, new_state = model.apply(variables, x, train=False)
>>> logits.shape
(4, 10)

Models (see :func:`names` and :func:`describe`): ``mlp``, ``mnist_mlp``, ``2c2d``,
``3c3d``, ``lenet5``, ``alexnet_mini``, ``resnet`` / ``resnet20`` / ``resnet56``,
``densenet_bc``, the NNX ``nnx_cnn``, the dynamic-capacity ``capacity_mlp`` and
``capacity_cnn`` (:mod:`jaxscope.models.capacity`), and the transformers
``transformer_lm`` (Linen, scanned or unrolled), ``nnx_transformer_lm`` (its NNX twin) and
``vit`` (:mod:`jaxscope.models.transformer`).
"""

from __future__ import annotations

from jaxscope.models.base import ModelDef, count_params
from jaxscope.models.capacity import (
  CAPACITY,
  CapacityCNN,
  CapacityConv,
  CapacityDense,
  CapacityInfo,
  CapacityMLP,
  CapacityResidualBlock,
  capacity_layers,
  reinit_chunk,
  trainable_mask,
  unit_mask,
)
from jaxscope.models.conv import AlexNetMini, LeNet5, ThreeC3D, TwoC2D
from jaxscope.models.densenet import DenseNetBC
from jaxscope.models.mlp import MLP, MnistMLP
from jaxscope.models.nnx_models import NNXCNN
from jaxscope.models.registry import build, describe, names
from jaxscope.models.resnet import BasicBlock, CifarResNet
from jaxscope.models.transformer import (
  DecoderLM,
  ViT,
  param_axes,
  stack_layers,
  unstack_layers,
)
from jaxscope.models.transformer_nnx import NNXDecoderLM

__all__ = [
  "CAPACITY",
  "MLP",
  "NNXCNN",
  "AlexNetMini",
  "BasicBlock",
  "CapacityCNN",
  "CapacityConv",
  "CapacityDense",
  "CapacityInfo",
  "CapacityMLP",
  "CapacityResidualBlock",
  "CifarResNet",
  "DecoderLM",
  "DenseNetBC",
  "LeNet5",
  "MnistMLP",
  "ModelDef",
  "NNXDecoderLM",
  "ThreeC3D",
  "TwoC2D",
  "ViT",
  "build",
  "capacity_layers",
  "count_params",
  "describe",
  "names",
  "param_axes",
  "reinit_chunk",
  "stack_layers",
  "trainable_mask",
  "unit_mask",
  "unstack_layers",
]
