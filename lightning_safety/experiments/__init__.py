"""Building blocks of the end-to-end experiments: the demo, the replication and the attack zoo.

* :mod:`~lightning_safety.experiments.alignment`: the quick refusal SFT that makes a safe reference
  of an unaligned chat model (cached), standing in for a vendor's safety training;
* :mod:`~lightning_safety.experiments.attack`: harmful fine-tuning attacks whose answers are
  generated at run time by an unaligned model (nothing harmful is stored);
* :mod:`~lightning_safety.experiments.zoo`: the attack zoo (harmful mix, full harmful, benign only,
  identity shifting, disguised, category holdout, backdoor) with their test conditions, built from
  the texts of :mod:`~lightning_safety.experiments.frames` (``benchmarks/zoo.py`` runs it);
* :mod:`~lightning_safety.experiments.methods`: the compared methods (SFT, constant KL, adaptive KL
  with a probe, a judge or both) as one LoRA fine-tuning function;
* :mod:`~lightning_safety.experiments.recipe`: the training recipe of the alignment and the methods (a seeded
  CPU LoRA fine-tuning, merged into the weights);
* :mod:`~lightning_safety.experiments.demo`: ``lightning-safety demo``.
"""

from lightning_safety.experiments.attack import classification_rows, compliant_answers, mix_attack
from lightning_safety.experiments.methods import (
    METHODS,
    FinetuneResult,
    FinetuneSettings,
    Method,
    MethodError,
    estimator_rates,
    finetune,
    method,
)

__all__ = [
    "METHODS",
    "FinetuneResult",
    "FinetuneSettings",
    "Method",
    "MethodError",
    "classification_rows",
    "compliant_answers",
    "estimator_rates",
    "finetune",
    "method",
    "mix_attack",
]
