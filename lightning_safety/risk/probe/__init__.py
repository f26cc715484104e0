"""Activation probe: harmful-intent risk from a frozen model's hidden states on the prompt.

The method of "Learning to Stay Safe" (arXiv 2602.17546): run the frozen (reference) model on
the prompt only, everything before the assistant's first token including the generation header
(``prompt_length`` of a training example), take the hidden states of one or more decoder
layers, pool them over the prompt, and classify with a light classifier.

Poolings:

* ``"last"``: the hidden state at the last prompt token (index ``prompt_length - 1``);
* ``"mean"``: the mean over the prompt tokens (padding excluded);
* ``"mean_all_layers"``: the authors' choice, mean-pooled states averaged over the given layers
  (H features). With several layers, ``"last"``/``"mean"`` concatenate them (len(layers) * H).

Under PEFT the probe reads the base weights (adapter disabled), i.e. the frozen reference the
KL term pulls toward, so the risk of an example does not drift while the adapter trains; pass
``use_adapter=True`` to read through the active adapter instead.

One module per job, every name importable from here:

* :mod:`~lightning_safety.risk.probe.features`: hidden states of the prompt, pooled into features;
* :mod:`~lightning_safety.risk.probe.training`: the classifier, :class:`ProbeTrainingSettings`, :func:`train_probe`;
* :mod:`~lightning_safety.risk.probe.artifact`: :class:`ActivationProbe` (save/load) and the model fingerprint;
* :mod:`~lightning_safety.risk.probe.fitting`: :func:`fit_probe`, prompts in, calibrated probe out;
* :mod:`~lightning_safety.risk.probe.layer_sweep`: :func:`sweep` over layers and poolings, its table and plot.
"""

from lightning_safety.risk.probe.artifact import (
    METADATA_FILE,
    PROBE_FORMAT,
    PROBE_VERSION,
    WEIGHTS_FILE,
    ActivationProbe,
    model_fingerprint,
    model_structure,
)
from lightning_safety.risk.probe.features import (
    POOLINGS,
    combine_layers,
    extract_features,
    featurize_pooled,
    featurize_prompts,
    pool_hidden,
    pooled_prompt_states,
    prompt_token_mask,
    render_prompt,
)
from lightning_safety.risk.probe.fitting import fit_probe
from lightning_safety.risk.probe.layer_sweep import plot_sweep, sweep, sweep_table
from lightning_safety.risk.probe.training import (
    TRAINING_DEFAULTS,
    ProbeClassifier,
    ProbeKind,
    ProbeTrainingSettings,
    _train_step,  # noqa: F401 (not public: tests drive one optimisation step)
    ranking_scores,
    stratified_split,
    train_probe,
)

__all__ = [
    "METADATA_FILE",
    "POOLINGS",
    "PROBE_FORMAT",
    "PROBE_VERSION",
    "TRAINING_DEFAULTS",
    "WEIGHTS_FILE",
    "ActivationProbe",
    "ProbeClassifier",
    "ProbeKind",
    "ProbeTrainingSettings",
    "combine_layers",
    "extract_features",
    "featurize_pooled",
    "featurize_prompts",
    "fit_probe",
    "model_fingerprint",
    "model_structure",
    "plot_sweep",
    "pool_hidden",
    "pooled_prompt_states",
    "prompt_token_mask",
    "ranking_scores",
    "render_prompt",
    "stratified_split",
    "sweep",
    "sweep_table",
    "train_probe",
]
