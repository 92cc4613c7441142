"""Rules over a recorded run that name a training problem, with the evidence and what to try.

:func:`diagnose` runs every rule of :data:`RULES` over a :class:`~jaxscope.record.History`
(or a run directory, or a mapping ``key -> (steps, values)``) and returns the
:class:`Finding` objects, the likeliest cause first. Each rule reads only the keys the training
loop writes (``loss``, ``train/accuracy``, ``test/loss``, ``lr``, ``hess_max_ev`` and the
per-layer ``{topic}/{stat}/{layer}`` metrics, see :mod:`jaxscope.train`) and the run's
``config.json`` (``lr``, ``num_classes``, ``model_args``, ``data_stats``), and skips
silently when they were not recorded or are too few (every rule has a minimum evidence).
Every threshold is a field of :class:`Thresholds` and can be overridden by name:
``diagnose(history, dead_fraction=0.3)``. Every finding states its confidence
(``"high"``, ``"medium"``, ``"low"``: how far its evidence is past the threshold, on how
many points). After a divergence, every rule but the divergence and the data rules reads
only the steps before it. The table of every finding is ``docs/diagnose-rules.md``.

The rules and their advice follow a training lecture's catalogue of loss-curve shapes,
their causes and what to try (divergence, oscillation, plateaus, overfitting), and the
per-layer health checks of live introspection (ikkuna, Cockpit): gradient flow
through depth, the update/weight ratio (target around ``1e-3``), dead and saturated
units, stalled layers, and the learning rate against the curvature
(gradient descent on a quadratic is stable only for ``lr · λ_max < 2``).

Conventions:

* **Depth order.** Layers are ordered by a natural sort of their names (``Dense_2``
  before ``Dense_10``), which for Flax's ``{Module}_{i}`` names is the order from input
  to output; the first layer is the input side, the last the output side. (The order of
  :meth:`History.layers` is the parameter flattening order, which sorts names as strings
  and puts ``Dense_10`` before ``Dense_2``.)
* **Weight layers.** Rules on gradients and update ratios look at the weight matrices
  (last name component ``kernel``, ``weight``, ``w`` or ``embedding``) when any are
  recorded, else at every layer: biases start at zero, so their ratios and norms are not
  comparable across layers.
* **Loss domain.** Oscillation is analysed on ``log(loss)`` when the loss is positive
  (multiplicative mini-batch noise becomes additive and stationary), else on the loss.
* **Steps.** Windows ("the last half", "the first 10 %") are fractions of the recorded
  step range of the series concerned; periods are in steps (the median spacing of the
  recorded steps times the period in samples).

Modules: :mod:`~jaxscope.diagnose.finding` (:class:`Finding`, :class:`Thresholds`, advice),
:mod:`~jaxscope.diagnose.series` (series helpers), the rules by family
(:mod:`~jaxscope.diagnose.loss`, :mod:`~jaxscope.diagnose.gradients`,
:mod:`~jaxscope.diagnose.activations`, :mod:`~jaxscope.diagnose.curvature`,
:mod:`~jaxscope.diagnose.data`, :mod:`~jaxscope.diagnose.causes`,
:mod:`~jaxscope.diagnose.budget`),
:mod:`~jaxscope.diagnose.registry` (:data:`RULES`, :func:`diagnose`),
:mod:`~jaxscope.diagnose.reporting` (:func:`report`, :func:`findings_to_json`) and
:mod:`~jaxscope.diagnose.live` (:class:`LiveDiagnosis`, during training).

Example:
  >>> from jaxscope.record import History
  >>> h = History([(s, {"loss": 2.0 if s < 5 else float("nan")}) for s in range(10)])
  >>> [f.name for f in diagnose(h)]
  ['divergence']
"""

from jaxscope.diagnose.finding import CONFIDENCES, SEVERITIES, Finding, Thresholds
from jaxscope.diagnose.live import LiveDiagnosis
from jaxscope.diagnose.registry import RULES, diagnose
from jaxscope.diagnose.reporting import findings_to_json, report

__all__ = [
  "CONFIDENCES",
  "RULES",
  "SEVERITIES",
  "Finding",
  "LiveDiagnosis",
  "Thresholds",
  "diagnose",
  "findings_to_json",
  "report",
]
