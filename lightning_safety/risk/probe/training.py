"""Probe classifier training: the classifier, its hyperparameters, the split, and the training loop.

:class:`ProbeTrainingSettings` holds the nine training hyperparameters and their defaults;
:func:`train_probe`, :func:`~lightning_safety.risk.probe.fit_probe`, :func:`~lightning_safety.risk.probe.sweep`
and the ``probe fit`` / ``probe sweep`` commands read their defaults from :data:`TRAINING_DEFAULTS`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_safety.errors import ProbeError, ProbeMismatchError
from lightning_safety.models import eval_mode
from lightning_safety.risk.metrics_core import accuracy, auroc

ProbeKind = Literal["logistic", "mlp"]


@dataclass(frozen=True)
class ProbeTrainingSettings:
    """Hyperparameters of a probe classifier's training, with their defaults (the only place they are set).

    Attributes:
        kind: ``"logistic"`` or ``"mlp"``.
        hidden: hidden units of the MLP.
        dropout: dropout of the MLP, in [0, 1).
        weight_decay: AdamW weight decay (L2 regularisation; biases are not decayed).
        lr: AdamW learning rate.
        epochs: maximum passes over the training split (the best validation epoch is kept).
        val_fraction: stratified validation share (0 = no validation).
        seed: seeds the split, initialisation, dropout and batch order.
        balance: weight the harmful class by n_benign / n_harmful.
    """

    kind: ProbeKind = "logistic"
    hidden: int = 64
    dropout: float = 0.1
    weight_decay: float = 1e-2
    lr: float = 1e-2
    epochs: int = 200
    val_fraction: float = 0.2
    seed: int = 0
    balance: bool = True


TRAINING_DEFAULTS = ProbeTrainingSettings()
"""The defaults that the training functions' and commands' keyword arguments take."""


# ---------------------------------------------------------------------------------------------
# Classifier and its training


class ProbeClassifier(nn.Module):
    """Standardise features, then a logistic (F -> 1) or MLP (F -> hidden -> ReLU -> dropout -> 1) head.

    The standardiser's ``mean``/``std`` [F] are buffers fitted on the training split only.
    """

    def __init__(
        self,
        num_features: int,
        kind: ProbeKind = TRAINING_DEFAULTS.kind,
        hidden: int = TRAINING_DEFAULTS.hidden,
        dropout: float = TRAINING_DEFAULTS.dropout,
    ) -> None:
        super().__init__()
        if kind not in ("logistic", "mlp"):
            raise ProbeError(f"unknown probe kind '{kind}': use 'logistic' or 'mlp'")
        if num_features < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ProbeError(
                f"probe sizes num_features={num_features}, hidden={hidden}, dropout={dropout} are invalid: "
                "use positive sizes and dropout in [0, 1)"
            )
        self.kind, self.num_features, self.hidden, self.dropout = kind, int(num_features), int(hidden), float(dropout)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        if kind == "logistic":
            self.net: nn.Module = nn.Linear(num_features, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(num_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
            )

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable)."""
        return {"num_features": self.num_features, "kind": self.kind, "hidden": self.hidden, "dropout": self.dropout}

    @torch.no_grad()
    def fit_standardizer(self, features: Tensor) -> None:
        """Set mean/std [F] from training features [N, F] (constant features get std 1)."""
        features = features.float()
        self.mean.copy_(features.mean(0))
        std = features.std(0, unbiased=False) if features.shape[0] > 1 else torch.ones_like(self.std)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, features: Tensor) -> Tensor:
        """Logits [N] from features [N, F]."""
        if features.shape[-1] != self.num_features:
            raise ProbeMismatchError(
                f"probe expects {self.num_features} features but got {features.shape[-1]}: "
                "use the layers and pooling the probe was trained with, on the same model"
            )
        x = (features.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, features: Tensor) -> Tensor:
        """Harmful probabilities [N] in [0, 1] (eval mode, no dropout)."""
        with eval_mode(self):
            return torch.sigmoid(self(features.to(self.mean.device)))


def _binary_labels(labels: Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(labels).reshape(-1).float()
    if labels.numel() != n:
        raise ProbeError(f"{n} feature rows but {labels.numel()} labels: pass one label per row")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ProbeError("probe labels must be 0 (benign) or 1 (harmful): convert the labels")
    return labels


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified split: (train indices, validation indices), each sorted ascending.

    Each class puts ``round(val_fraction * n_class)`` rows (at least one, and never all) in validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ProbeError(f"val_fraction {val_fraction} is outside [0, 1): use e.g. 0.2")
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.as_tensor(labels).reshape(-1)
    train, val = [], []
    for value in (0, 1):
        index = (labels == value).nonzero().squeeze(1)
        index = index[torch.randperm(index.numel(), generator=generator)]
        n_val = 0
        if val_fraction > 0:
            n_val = min(max(round(val_fraction * index.numel()), 1), index.numel() - 1)
        val.append(index[:n_val])
        train.append(index[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _train_step(classifier: ProbeClassifier, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, x: Tensor, y: Tensor) -> float:
    """One optimisation step; gradients are cleared first (the authors' MLP accumulated them)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(classifier(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


_SMALL_PROBLEM = 2_000_000  # feature values below which one CPU thread is fastest


@contextlib.contextmanager
def _cpu_threads_for(numel: int) -> Iterator[None]:
    """One intra-op thread for small problems: thousands of tiny ops lose more to thread
    synchronisation than they gain (10x slower on a busy 2-core machine); restored afterwards."""
    previous = torch.get_num_threads()
    if numel <= _SMALL_PROBLEM and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@torch.no_grad()
def _eval_loss(classifier: ProbeClassifier, loss_fn: nn.Module, x: Tensor, y: Tensor) -> float:
    with eval_mode(classifier):
        return float(loss_fn(classifier(x), y))


def ranking_scores(classifier: ProbeClassifier, features: Tensor) -> Tensor:
    """Logits [N] for ranking metrics (AUROC, recall at FPR): float32 sigmoids saturate to exactly
    0 or 1 for confident probes, and the ties would distort the ranking."""
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            return classifier(features).float()
    finally:
        classifier.train(was_training)


def train_probe(
    features: Tensor,
    labels: Tensor,
    *,
    kind: ProbeKind = TRAINING_DEFAULTS.kind,
    hidden: int = TRAINING_DEFAULTS.hidden,
    dropout: float = TRAINING_DEFAULTS.dropout,
    weight_decay: float = TRAINING_DEFAULTS.weight_decay,
    lr: float = TRAINING_DEFAULTS.lr,
    epochs: int = TRAINING_DEFAULTS.epochs,
    val_fraction: float = TRAINING_DEFAULTS.val_fraction,
    seed: int = TRAINING_DEFAULTS.seed,
    balance: bool = TRAINING_DEFAULTS.balance,
    batch_size: int | None = None,
    patience: int | None = 50,
) -> tuple[ProbeClassifier, dict[str, Any]]:
    """Train a probe classifier with early stopping on the validation loss.

    Args:
        features: [N, F] probe features.
        labels: [N] 1 = harmful, 0 = benign.
        kind: ``"logistic"`` or ``"mlp"`` (``hidden`` units, ``dropout``).
        weight_decay, lr: AdamW settings (biases are not decayed).
        epochs: maximum passes over the training split.
        val_fraction: stratified validation share (0 = no validation: keep the best training loss).
        seed: seeds the split, initialisation, dropout and batch order (global RNG untouched).
        balance: weight the harmful class by n_benign / n_harmful (``pos_weight``).
        batch_size: mini-batch size; None = full batch.
        patience: stop after this many epochs without a better validation loss (None = never).

    Returns:
        The classifier with the best-validation-loss weights, in eval mode, and metrics:
        ``n_train``, ``n_val``, ``train_auroc``, ``val_auroc``, ``val_accuracy`` (at 0.5; None
        without validation), ``train_loss_initial``, ``train_loss_final``, ``best_epoch``, ``epochs_run``.
    """
    if features.ndim != 2:
        raise ProbeError(f"probe features must be a 2-D tensor [N, F], got shape {tuple(features.shape)}")
    x = features.detach().float().cpu()
    y = _binary_labels(labels, x.shape[0])
    if not torch.isfinite(x).all():
        raise ProbeError("probe features contain NaN or infinity: check the model's dtype (try float32)")
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    least = 2 if val_fraction > 0 else 1
    if n_pos < least or n_neg < least:
        raise ProbeError(
            f"a probe needs at least {least} harmful and {least} benign examples (got {n_pos} and {n_neg}): add examples"
        )
    train_idx, val_idx = stratified_split(y, val_fraction, seed)
    x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    has_val = val_idx.numel() > 0
    train_pos = float(y_train.sum())
    pos_weight = torch.tensor((y_train.numel() - train_pos) / train_pos) if balance else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    with torch.random.fork_rng(devices=[]), _cpu_threads_for(x_train.numel() * (hidden if kind == "mlp" else 1)):
        torch.manual_seed(seed)
        classifier = ProbeClassifier(x.shape[1], kind=kind, hidden=hidden, dropout=dropout)
        classifier.fit_standardizer(x_train)
        decay = [p for name, p in classifier.named_parameters() if name.endswith("weight")]
        no_decay = [p for name, p in classifier.named_parameters() if not name.endswith("weight")]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
        order_generator = torch.Generator().manual_seed(int(seed) + 1)
        monitor_x, monitor_y = (x_val, y_val) if has_val else (x_train, y_train)
        initial_loss = _eval_loss(classifier, loss_fn, x_train, y_train)
        best_loss = _eval_loss(classifier, loss_fn, monitor_x, monitor_y)
        best_state, best_epoch, epochs_run = copy.deepcopy(classifier.state_dict()), 0, 0
        step = batch_size or x_train.shape[0]
        for epoch in range(1, epochs + 1):
            classifier.train()
            order = torch.randperm(x_train.shape[0], generator=order_generator) if batch_size else torch.arange(x_train.shape[0])
            for start in range(0, x_train.shape[0], step):
                rows = order[start : start + step]
                _train_step(classifier, optimizer, loss_fn, x_train[rows], y_train[rows])
            epochs_run = epoch
            loss = _eval_loss(classifier, loss_fn, monitor_x, monitor_y)
            if loss < best_loss - 1e-7:
                best_loss, best_state, best_epoch = loss, copy.deepcopy(classifier.state_dict()), epoch
            elif patience is not None and epoch - best_epoch >= patience:
                break
    classifier.load_state_dict(best_state)
    classifier.eval()

    metrics: dict[str, Any] = {
        "kind": kind,
        "n_train": int(train_idx.numel()),
        "n_val": int(val_idx.numel()),
        "train_auroc": auroc(ranking_scores(classifier, x_train), y_train),
        "val_auroc": None,
        "val_accuracy": None,
        "train_loss_initial": initial_loss,
        "train_loss_final": _eval_loss(classifier, loss_fn, x_train, y_train),
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
    }
    if has_val:
        metrics["val_auroc"] = auroc(ranking_scores(classifier, x_val), y_val)
        metrics["val_accuracy"] = accuracy(classifier.predict_proba(x_val), y_val)
    return classifier, metrics


__all__ = [
    "TRAINING_DEFAULTS",
    "ProbeClassifier",
    "ProbeKind",
    "ProbeTrainingSettings",
    "ranking_scores",
    "stratified_split",
    "train_probe",
]
