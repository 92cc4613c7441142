"""Layer outputs, inputs and ``∂L/∂(layer output)`` from Flax models, model code untouched.

Two entry points:

* :func:`intercept`: a context manager, used *inside* the traced function, that observes
  every ``__call__`` of a Flax Linen module (through ``flax.linen.intercept_methods``) and
  of a Flax NNX module (through a temporary patch of the NNX module classes), records the
  outputs ``y_l`` (and optionally the first positional inputs) of the recorded layers, and
  returns ``y_l + ε_l`` to the model when a perturbation ``ε_l`` is given for layer ``l``.
* :func:`value_and_grad`: ``jax.value_and_grad`` that also returns the captured outputs
  and, per layer, ``∂L/∂y_l = ∂L(θ, ε)/∂ε_l |_{ε=0}`` (the gradient w.r.t. a zero
  perturbation added to the layer's output, the recipe of jax-notes §2).

Which calls are recorded: the modules that directly own parameters (Linen: the module's
own ``params`` collection has array leaves of its own, e.g. ``Dense``, ``Conv``,
``BatchNorm``; NNX: the module has ``nnx.Param`` attributes), except the root module,
then filtered by ``include`` / ``exclude`` regular expressions (``re.search`` on the
layer key, as :func:`jaxscope.tree.layout`). Only ``__call__`` is recorded, and only
calls whose output is a single array.

Layer keys are ``'/'``-joined module paths and match the parameter names' prefixes:
Linen ``"Dense_0"``, ``"Block_0/Conv_1"`` (``module.path``); NNX the attribute path from
the root, ``"linear1"``, ``"blocks/0/conv"``, the prefixes of
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` joined with ``'/'``.

Pitfalls:

* Interception acts at **trace time**. The ``with intercept(...)`` block (or the call of
  :func:`value_and_grad`) must sit *inside* the function you ``jit`` / ``grad``; a jitted
  ``model.apply`` that JAX has already compiled does not see an interceptor set up
  outside it (jax-notes §2).
* The NNX patch replaces ``__call__`` on every ``nnx.Module`` subclass that defines it
  (its own ``__dict__``) while a context is active, and restores the original functions
  in a ``finally``. It is process-global: do not trace two intercepted functions
  concurrently from several threads. Classes defined while a context is active are not
  patched. For NNX the key of a module is found from the *outermost* NNX call (the root:
  its ``nnx.iter_modules`` paths), so a layer called directly, outside its model, is
  its own root and is not recorded.
* "Output" is what the module's ``__call__`` returns. ``Dense`` / ``Conv`` followed by a
  functional activation (``x = nn.relu(nn.Dense(8)(x))``) is captured **before** the
  activation (the pre-activation). Activation *modules* own no parameters, so they are
  not recorded either. Outputs that are not a single array (tuples, dicts) are skipped.
* The root module is never a layer: a bare ``nn.Dense`` used as the whole model records
  nothing (wrap it in a module).
* A layer called twice in one traced call (a shared layer, or ``fn`` running the model
  twice) raises ``ValueError``: one output and one perturbation per layer is all that
  the key scheme can express. Run each forward pass in its own function.
* **Layer-stacked models** (``nn.scan``, ``nnx.scan`` over ``nnx.vmap``-created layers,
  or any ``jax.lax.scan`` over layers): while a context is active ``jax.lax.scan`` is
  replaced by a wrapper that carries the body's recorded outputs (and inputs) out as
  scan outputs and feeds perturbations in as scanned inputs, so a layer inside the loop
  is recorded once with a leading layer axis: ``"blocks/fc"`` of shape ``[L, B, …]``
  (and ``∂L/∂y`` of that shape). Measure it per layer with
  ``scope(..., stacked={"^blocks": 0})``. Inside ``nnx.scan`` the called modules are
  copies; each gets the path of the root's module of the same class whose parameters
  have the scan's length in front (none or several: not recorded).
* Layers called in any *other* nested trace (``jax.checkpoint`` / ``nn.remat``,
  ``vmap``, Flax's shape-only passes) cannot be exported from it: they are left out
  and listed in :attr:`Recording.skipped`.
"""

from jaxscope.capture.grad import value_and_grad
from jaxscope.capture.layers import Captured, ConvSpec, LayerCall
from jaxscope.capture.recording import Recording, intercept

__all__ = ["Captured", "ConvSpec", "LayerCall", "Recording", "intercept", "value_and_grad"]
