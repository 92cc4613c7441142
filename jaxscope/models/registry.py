"""The model registry: names, one-line descriptions and :func:`build`."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxscope.models.base import (
  ModelDef,
  check_input_shape,
  check_num_classes,
  linen_model_def,
)
from jaxscope.models.build_args import min_side, positive_ints, real
from jaxscope.models.capacity import CapacityCNN, CapacityMLP, initializer
from jaxscope.models.conv import AlexNetMini, LeNet5, ThreeC3D, TwoC2D
from jaxscope.models.densenet import DenseNetBC
from jaxscope.models.external import build_external, import_object, is_external
from jaxscope.models.keywords import check_model_options
from jaxscope.models.mlp import MLP, MnistMLP
from jaxscope.models.nnx_models import nnx_model_def
from jaxscope.models.resnet import CifarResNet
from jaxscope.models.transformer_builders import nnx_transformer_lm, transformer_lm, vit

__all__ = ["build", "describe", "names"]

_CONV_RANKS = (2, 3)


def _mlp(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  hidden_sizes: Sequence[int] = (128, 64),
) -> ModelDef:
  hidden = positive_ints(name, "hidden_sizes", hidden_sizes, allow_empty=True)
  module = MLP(hidden_sizes=hidden, num_outputs=num_classes)
  return linen_model_def(
    name, module, input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


def _mnist_mlp(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
  return linen_model_def(
    name, MnistMLP(num_classes), input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


def _2c2d(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
  return linen_model_def(
    name, TwoC2D(num_classes), input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


def _3c3d(
  name: str, input_shape: tuple[int, ...], num_classes: int, *, padding: str = "VALID"
) -> ModelDef:
  if padding not in ("VALID", "SAME"):
    raise ValueError(f"build({name!r}): padding must be 'VALID' or 'SAME', got {padding!r}.")
  if padding == "VALID":
    # conv5 VALID -> pool 3/2 SAME -> conv3 VALID must leave at least one pixel.
    min_side(name, input_shape, 9, " Pass padding='SAME' to use SAME convolutions on small inputs.")
  module = ThreeC3D(num_classes, padding=padding)
  return linen_model_def(
    name, module, input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


def _lenet5(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
  return linen_model_def(
    name, LeNet5(num_classes), input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


def _alexnet_mini(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelDef:
  # Two VALID 3x3 convs then a VALID 2x2 pool: floor((n - 4) / 2) >= 1.
  min_side(name, input_shape, 6)
  return linen_model_def(
    name,
    AlexNetMini(num_classes),
    input_shape,
    num_classes,
    has_batch_stats=False,
    has_dropout=True,
  )


def _resnet(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  depth: int = 20,
  widths: Sequence[int] = (16, 32, 64),
) -> ModelDef:
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(
      f"build({name!r}): depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
      f"got {depth!r}."
    )
  w = positive_ints(name, "widths", widths)
  if len(w) != 3:
    raise ValueError(f"build({name!r}): widths must have 3 entries, got {widths!r}.")
  module = CifarResNet(depth=depth, num_classes=num_classes, widths=w)
  return linen_model_def(
    name, module, input_shape, num_classes, has_batch_stats=True, has_dropout=False
  )


def _resnet_preset(depth: int) -> Callable[..., ModelDef]:
  def builder(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: Sequence[int] = (16, 32, 64),
  ) -> ModelDef:
    return _resnet(name, input_shape, num_classes, depth=depth, widths=widths)

  return builder


def _densenet_bc(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  depth: int = 40,
  growth_rate: int = 12,
  compression: float = 0.5,
  block_sizes: Sequence[int] | None = None,
) -> ModelDef:
  if block_sizes is None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
      raise ValueError(
        f"build({name!r}): depth must be 6n + 4 with n >= 1 (10, 40, 100, ...), got {depth!r}."
      )
    blocks = ((depth - 4) // 6,) * 3
  else:
    blocks = positive_ints(name, "block_sizes", block_sizes)
  if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
    raise ValueError(
      f"build({name!r}): growth_rate must be a positive integer, got {growth_rate!r}."
    )
  if not real(compression) or not 0.0 < compression <= 1.0:
    raise ValueError(f"build({name!r}): compression must be in (0, 1], got {compression!r}.")
  module = DenseNetBC(
    block_sizes=blocks,
    growth_rate=growth_rate,
    compression=float(compression),
    num_classes=num_classes,
  )
  return linen_model_def(
    name, module, input_shape, num_classes, has_batch_stats=True, has_dropout=False
  )


def _nnx_cnn(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  features: Sequence[int] = (16, 32),
  hidden: int = 64,
  dropout_rate: float = 0.25,
) -> ModelDef:
  f = positive_ints(name, "features", features)
  if len(f) != 2:
    raise ValueError(f"build({name!r}): features must have 2 entries, got {features!r}.")
  (h,) = positive_ints(name, "hidden", (hidden,))
  if not real(dropout_rate) or not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"build({name!r}): dropout_rate must be in [0, 1), got {dropout_rate!r}.")
  return nnx_model_def(
    name, input_shape, num_classes, features=f, hidden=h, dropout_rate=dropout_rate
  )


def _capacity_chunks(name: str, widths: tuple[int, ...], chunks: Any, initial_chunks: Any) -> None:
  (c,) = positive_ints(name, "chunks", (chunks,))
  bad = [w for w in widths if w % c]
  if bad:
    raise ValueError(
      f"build({name!r}): every width must be divisible by chunks={c}, got width(s) {bad}."
    )
  if (
    isinstance(initial_chunks, bool)
    or not isinstance(initial_chunks, int | np.integer)
    or not 0 <= initial_chunks <= c
  ):
    raise ValueError(
      f"build({name!r}): initial_chunks must be an integer in [0, {c}], got {initial_chunks!r}."
    )


def _capacity_inits(name: str, kernel_init: Any, bias_init: Any) -> None:
  """Names unknown to :data:`jaxscope.models.capacity.INITIALIZERS` fail here, naming the option."""
  initializer(kernel_init, what=f"build({name!r}): kernel_init")
  initializer(bias_init, what=f"build({name!r}): bias_init")


def _capacity_mlp(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  widths: Sequence[int] = (500,),
  chunks: int = 5,
  activation: str = "tanh",
  initial_chunks: int = 1,
  kernel_init: Any = "lecun_normal",
  bias_init: Any = "zeros",
) -> ModelDef:
  w = positive_ints(name, "widths", widths)
  _capacity_chunks(name, w, chunks, initial_chunks)
  if activation not in ("tanh", "relu"):
    raise ValueError(f"build({name!r}): activation must be 'tanh' or 'relu', got {activation!r}.")
  _capacity_inits(name, kernel_init, bias_init)
  module = CapacityMLP(
    widths=w,
    chunks=int(chunks),
    activation=activation,
    num_outputs=num_classes,
    initial_chunks=int(initial_chunks),
    kernel_init=kernel_init,
    bias_init=bias_init,
  )
  return linen_model_def(
    name, module, input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


def _capacity_cnn(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  features: Sequence[int] = (30, 60),
  hidden: int = 120,
  chunks: int = 10,
  initial_chunks: int = 1,
  kernel_init: Any = "lecun_normal",
  bias_init: Any = "zeros",
) -> ModelDef:
  f = positive_ints(name, "features", features)
  (h,) = positive_ints(name, "hidden", (hidden,))
  _capacity_chunks(name, (*f, h), chunks, initial_chunks)
  _capacity_inits(name, kernel_init, bias_init)
  module = CapacityCNN(
    features=f,
    hidden=h,
    chunks=int(chunks),
    num_classes=num_classes,
    initial_chunks=int(initial_chunks),
    kernel_init=kernel_init,
    bias_init=bias_init,
  )
  return linen_model_def(
    name, module, input_shape, num_classes, has_batch_stats=False, has_dropout=False
  )


class _Entry(NamedTuple):
  description: str
  builder: Callable[..., ModelDef]
  ranks: tuple[int, ...]


_REGISTRY: dict[str, _Entry] = {
  "mlp": _Entry(
    "MLP on the flattened input, hidden_sizes=(128, 64), ReLU; num_classes=1 for regression",
    _mlp,
    (1, 2, 3),
  ),
  "mnist_mlp": _Entry(
    "DeepOBS mnist_mlp: flatten-1000-500-100-classes, ReLU (Schneider et al. 2019)",
    _mnist_mlp,
    (1, 2, 3),
  ),
  "2c2d": _Entry(
    "DeepOBS 2c2d: 2 conv5x5 (32, 64) + maxpool, FC 1024, FC classes (Schneider et al. 2019)",
    _2c2d,
    _CONV_RANKS,
  ),
  "3c3d": _Entry(
    "DeepOBS 3c3d: 3 conv (64, 96, 128) + maxpool, FC 512, 256, classes (Schneider et al. 2019)",
    _3c3d,
    _CONV_RANKS,
  ),
  "lenet5": _Entry(
    "LeNet-5 (nnvis variant): 2 conv3x3 (6, 16) + maxpool, FC 120, 84, classes",
    _lenet5,
    _CONV_RANKS,
  ),
  "alexnet_mini": _Entry(
    "ikkuna AlexNetMini: conv3x3 4, conv3x3 8, maxpool, dropout, FC 16, dropout, FC classes",
    _alexnet_mini,
    _CONV_RANKS,
  ),
  "resnet": _Entry(
    "CIFAR ResNet of depth 6n+2 (depth=20), BatchNorm, projection shortcuts (He et al. 2016)",
    _resnet,
    _CONV_RANKS,
  ),
  "resnet20": _Entry(
    "CIFAR ResNet-20, BatchNorm, projection shortcuts (He et al. 2016)",
    _resnet_preset(20),
    _CONV_RANKS,
  ),
  "resnet56": _Entry(
    "CIFAR ResNet-56, BatchNorm, projection shortcuts (He et al. 2016)",
    _resnet_preset(56),
    _CONV_RANKS,
  ),
  "densenet_bc": _Entry(
    "DenseNet-BC, growth 12, depth=40 (block_sizes=(16, 16, 16) for BC-100) (Huang et al. 2017)",
    _densenet_bc,
    _CONV_RANKS,
  ),
  "nnx_cnn": _Entry(
    "Flax NNX CNN: 2 conv3x3 (16, 32) + maxpool, Linear 64, dropout, Linear classes",
    _nnx_cnn,
    _CONV_RANKS,
  ),
  "capacity_mlp": _Entry(
    "Dynamic-capacity MLP: CapacityDense widths=(500,) in chunks=5, tanh; sine network; "
    "kernel_init (e.g. glorot_uniform, the thesis's Xavier), bias_init",
    _capacity_mlp,
    (1, 2, 3),
  ),
  "capacity_cnn": _Entry(
    "Dynamic-capacity CNN: 2 CapacityConv3x3 (30, 60) + maxpool, CapacityDense 120, in tenths; "
    "kernel_init, bias_init",
    _capacity_cnn,
    _CONV_RANKS,
  ),
  "transformer_lm": _Entry(
    "Decoder-only LM on int32 token ids [T] (num_classes = vocabulary): embeddings + learned "
    "positions, n_layers=2 causal pre-LN blocks (d_model=64, num_heads=4, GELU MLP x4), "
    "DenseGeneral attention; scan=True stacks the blocks with nn.scan; tie_embeddings, "
    "dtype/param_dtype (e.g. dtype=bfloat16)",
    transformer_lm,
    (1,),
  ),
  "nnx_transformer_lm": _Entry(
    "Flax NNX twin of transformer_lm, blocks stacked by nnx.vmap and applied by nnx.scan "
    "(the scanned Linen model's parameter tree); tie_embeddings, dtype/param_dtype",
    nnx_transformer_lm,
    (1,),
  ),
  "vit": _Entry(
    "Vision transformer: patch=4 convolutional patch embedding, class token (pool='cls' or "
    "'mean'), learned positions, n_layers=2 pre-LN blocks (d_model=64, num_heads=4); scan, "
    "dtype/param_dtype (Dosovitskiy et al. 2021)",
    vit,
    _CONV_RANKS,
  ),
}


def names() -> list[str]:
  """Returns the registered model names, in registration order."""
  return list(_REGISTRY)


def _entry(name: Any) -> _Entry:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
      f"Unknown model name {name!r}{hint}; available models: {', '.join(_REGISTRY)}."
    )
  return _REGISTRY[name]


def describe(name: str) -> str:
  """Returns a one-line description of a registered model (for ``jaxscope list-models``).

  Raises:
    ValueError: for an unknown name, listing the available ones.
  """
  return _entry(name).description


def build(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> ModelDef:
  """Builds a registered model for one input shape and number of classes.

  Args:
    name: a name from :func:`names`, or ``"module:attribute"`` naming a model factory of
      your own (:mod:`jaxscope.models.external`).
    input_shape: one example's shape without the batch axis: ``(H, W, C)`` for images
      (``(8, 8, 1)`` digits, ``(28, 28, 1)`` MNIST, ``(32, 32, 3)`` CIFAR), ``(L, C)``
      for 1-D signals (``(40, 1)`` MNIST-1D), ``(D,)`` feature vectors (``(1,)`` sine
      regression; ``mlp`` and ``mnist_mlp`` only), ``(T,)`` token sequences
      (``transformer_lm`` and ``nnx_transformer_lm`` only).
    num_classes: outputs per example (1 for regression).
    **kwargs: model options: ``mlp``: ``hidden_sizes``; ``3c3d``: ``padding``;
      ``resnet``: ``depth``, ``widths``; ``resnet20``/``resnet56``: ``widths``;
      ``densenet_bc``: ``depth``, ``growth_rate``, ``compression``, ``block_sizes``;
      ``nnx_cnn``: ``features``, ``hidden``, ``dropout_rate``; ``capacity_mlp``:
      ``widths``, ``chunks``, ``activation``, ``initial_chunks``, ``kernel_init``,
      ``bias_init``; ``capacity_cnn``: ``features``, ``hidden``, ``chunks``,
      ``initial_chunks``, ``kernel_init``, ``bias_init`` (initialisers by name, e.g.
      ``"glorot_uniform"``, see :data:`jaxscope.models.capacity.INITIALIZERS`, applied to
      every layer, the capacity layers at full width; their variables hold a
      ``'capacity'`` collection next to ``'params'``, see :mod:`jaxscope.models.capacity`);
      ``transformer_lm`` (input ``(T,)`` int32 token ids, ``num_classes`` = vocabulary):
      ``d_model``, ``num_heads``, ``n_layers``, ``mlp_ratio``, ``scan``,
      ``tie_embeddings``, ``dtype``, ``param_dtype`` (names such as ``"bfloat16"`` or
      dtypes); ``nnx_transformer_lm``: the same without ``scan`` (always stacked);
      ``vit``: ``patch``, ``d_model``, ``num_heads``, ``n_layers``, ``mlp_ratio``,
      ``pool``, ``scan``, ``dtype``, ``param_dtype`` (see
      :mod:`jaxscope.models.transformer`).

  Returns:
    A :class:`~jaxscope.models.base.ModelDef`.

  Raises:
    ValueError: for an unknown name (listing the available ones), a bad
      ``input_shape`` or ``num_classes``, or a bad option value.
    OptionError: (a ``ValueError`` and a ``TypeError``) for an option the model does not
      take (the message lists those it takes), or a text where it takes a number or a bool.

  Example:

  >>> import jax, jax.numpy as jnp
  >>> from jaxscope.models import build, count_params
  >>> model = build('mlp', (8, 8, 1), 10)
  >>> x = jnp.zeros((2, 8, 8, 1))
  >>> variables = model.init(jax.random.key(0), x)
  >>> logits, new_state = model.apply(variables, x, train=True)
  >>> logits.shape, new_state
  ((2, 10), {})
  >>> count_params(variables['params'])  # 64·128+128 + 128·64+64 + 64·10+10
  17226
  """
  if is_external(name):  # "module:attribute": the user's own model.
    check_model_options(name, import_object(name, what="model"), 2, kwargs)
    return build_external(name, input_shape, num_classes, **kwargs)
  entry = _entry(name)
  shape = check_input_shape(name, input_shape, ranks=entry.ranks)
  classes = check_num_classes(name, num_classes)
  check_model_options(name, entry.builder, 3, kwargs)
  return entry.builder(name, shape, classes, **kwargs)
