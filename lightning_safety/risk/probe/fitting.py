"""The one-call entry point :func:`fit_probe`: featurize prompts, train a probe, calibrate its threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_safety.errors import CalibrationError, ProbeError
from lightning_safety.risk.calibration import min_calibration_size
from lightning_safety.risk.hooks import resolve_layer_indices
from lightning_safety.risk.probe.artifact import ActivationProbe, _default_model_name, model_fingerprint, model_structure
from lightning_safety.risk.probe.features import featurize_prompts
from lightning_safety.risk.probe.training import TRAINING_DEFAULTS, ProbeKind, train_probe


def _holdout(n: int, fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Seeded (kept, held out) index lists with round(fraction * n) held out."""
    order = torch.randperm(n, generator=generator).tolist()
    held = round(fraction * n)
    return sorted(order[held:]), sorted(order[:held])


def fit_probe(
    model: nn.Module,
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    benign_prompts: Sequence[str],
    *,
    layers: Sequence[int],
    pooling: str = "mean",
    kind: ProbeKind = TRAINING_DEFAULTS.kind,
    hidden: int = TRAINING_DEFAULTS.hidden,
    dropout: float = TRAINING_DEFAULTS.dropout,
    weight_decay: float = TRAINING_DEFAULTS.weight_decay,
    lr: float = TRAINING_DEFAULTS.lr,
    epochs: int = TRAINING_DEFAULTS.epochs,
    val_fraction: float = TRAINING_DEFAULTS.val_fraction,
    seed: int = TRAINING_DEFAULTS.seed,
    balance: bool = TRAINING_DEFAULTS.balance,
    calibration_fraction: float = 0.2,
    alpha: float = 0.1,
    delta: float = 0.05,
    batch_size: int = 16,
    system_prompt: str | None = None,
    model_name: str | None = None,
    progress: bool = False,
) -> ActivationProbe:
    """Featurize prompts, train a probe, and (optionally) calibrate its threshold.

    ``calibration_fraction`` of the harmful prompts (and of the benign ones, for the empirical
    FPR) is held out from training, seeded by ``seed``, and used by :meth:`ActivationProbe.calibrate`
    with (``alpha``, ``delta``); 0 skips calibration (threshold 0.5). Other arguments: see
    :func:`featurize_prompts` and :func:`train_probe`.
    """
    if not 0.0 <= calibration_fraction < 1.0:
        raise ProbeError(f"calibration_fraction {calibration_fraction} is outside [0, 1): use e.g. 0.2, or 0 to skip")
    n_cal = round(calibration_fraction * len(harmful_prompts))
    if calibration_fraction > 0 and n_cal < min_calibration_size(alpha, delta):
        raise CalibrationError(
            f"calibration_fraction={calibration_fraction} holds out {n_cal} of {len(harmful_prompts)} harmful prompts, "
            f"fewer than the {min_calibration_size(alpha, delta)} needed for alpha={alpha}, delta={delta}: "
            "add harmful prompts, raise calibration_fraction, loosen alpha/delta, or set calibration_fraction=0"
        )
    num_layers, hidden_size = model_structure(model)
    resolved = resolve_layer_indices(layers, num_layers)
    prompts = list(harmful_prompts) + list(benign_prompts)
    features = featurize_prompts(
        model, tokenizer, prompts, layers=resolved, pooling=pooling,
        batch_size=batch_size, system_prompt=system_prompt, progress=progress,
    )
    n_harm = len(harmful_prompts)
    generator = torch.Generator().manual_seed(int(seed))
    harm_keep, harm_cal = _holdout(n_harm, calibration_fraction, generator)
    benign_keep, benign_cal = _holdout(len(benign_prompts), calibration_fraction, generator)
    train_rows = harm_keep + [n_harm + i for i in benign_keep]
    labels = torch.cat([torch.ones(len(harm_keep)), torch.zeros(len(benign_keep))])
    classifier, metrics = train_probe(
        features[train_rows], labels, kind=kind, hidden=hidden, dropout=dropout, weight_decay=weight_decay,
        lr=lr, epochs=epochs, val_fraction=val_fraction, seed=seed, balance=balance,
    )
    probe = ActivationProbe(
        classifier=classifier,
        model_name=model_name or _default_model_name(model),
        fingerprint=model_fingerprint(model),
        layers=resolved,
        pooling=pooling,
        hidden_size=hidden_size,
        num_layers=num_layers,
        metrics=metrics,
        system_prompt=system_prompt,
    )
    if calibration_fraction > 0:
        harmful_scores = classifier.predict_proba(features[harm_cal])
        benign_scores = classifier.predict_proba(features[[n_harm + i for i in benign_cal]]) if benign_cal else None
        probe.calibrate(harmful_scores, benign_scores, alpha=alpha, delta=delta)
        metrics["n_calibration_harmful"], metrics["n_calibration_benign"] = len(harm_cal), len(benign_cal)
    return probe


__all__ = ["fit_probe"]
