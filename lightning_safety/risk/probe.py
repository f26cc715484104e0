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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_safety.data.formatting import render_ids, require_chat_template, resolve_pad_token_id
from lightning_safety.errors import CalibrationError, ProbeError, ProbeMismatchError
from lightning_safety.models import eval_mode, is_peft_model, supports_logits_to_keep
from lightning_safety.paths import atomic_directory
from lightning_safety.risk.calibration import CalibratedThreshold, calibrate_threshold, min_calibration_size
from lightning_safety.distributed import is_sharded
from lightning_safety.risk.hooks import CaptureComplete, LayerTaps, find_decoder_layers, resolve_layer_indices
from lightning_safety.risk.metrics_core import accuracy, auroc, recall_at_fpr

POOLINGS = ("last", "mean", "mean_all_layers")
ProbeKind = Literal["logistic", "mlp"]
PROBE_FORMAT = "lightning_safety.activation_probe"
PROBE_VERSION = 1
WEIGHTS_FILE = "probe.safetensors"
METADATA_FILE = "probe.json"


# ---------------------------------------------------------------------------------------------
# Pooling


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ProbeError(f"unknown pooling '{pooling}': use one of {', '.join(POOLINGS)}")


def prompt_token_mask(attention_mask: Tensor, prompt_length: Tensor, width: int) -> Tensor:
    """Bool mask [B, width]: True on prompt tokens (positions < prompt_length that are attended).

    Raises:
        ProbeError: a prompt length is < 1 or > width, or a prompt token is padding (left padding).
    """
    prompt_length = prompt_length.to(attention_mask.device).long()
    if prompt_length.numel() and (int(prompt_length.min()) < 1 or int(prompt_length.max()) > width):
        raise ProbeError(
            f"prompt_length must lie in [1, {width}] (got {prompt_length.tolist()}): "
            "count the prompt tokens before the first assistant token"
        )
    positions = torch.arange(width, device=attention_mask.device)
    in_prompt = positions[None, :] < prompt_length[:, None]
    if not bool(attention_mask[:, :width].bool()[in_prompt].all()):
        raise ProbeError("padding found inside a prompt (left padding?): pad batches on the right for the probe")
    return in_prompt


def pool_hidden(hidden: Tensor, prompt_mask: Tensor, prompt_length: Tensor, how: str) -> Tensor:
    """Pool one layer's hidden states over the prompt.

    Args:
        hidden: [B, P, H] hidden states of the prompt columns.
        prompt_mask: [B, P] bool, True on prompt tokens.
        prompt_length: [B] number of prompt tokens per row.
        how: ``"last"`` or ``"mean"``.

    Returns:
        [B, H] float32.
    """
    hidden = hidden.float()
    if how == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, prompt_length.to(hidden.device).long() - 1]
    if how == "mean":
        weights = prompt_mask.to(hidden.device, torch.float32).unsqueeze(-1)  # [B, P, 1]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    raise ProbeError(f"unknown per-layer pooling '{how}': use 'last' or 'mean'")


def combine_layers(pooled: Mapping[int, Mapping[str, Tensor]], layers: Sequence[int], pooling: str) -> Tensor:
    """Features [B, F] from per-layer pooled states ``pooled[layer][how]`` [B, H].

    ``"last"``/``"mean"`` concatenate the layers in the given order (F = len(layers) * H);
    ``"mean_all_layers"`` averages the mean-pooled states of the layers (F = H).
    """
    _check_pooling(pooling)
    if pooling == "mean_all_layers":
        return torch.stack([pooled[layer]["mean"] for layer in layers]).mean(0)
    return torch.cat([pooled[layer][pooling] for layer in layers], dim=-1)


def _per_layer_poolings(pooling: str) -> tuple[str, ...]:
    return ("mean",) if pooling == "mean_all_layers" else (pooling,)


# ---------------------------------------------------------------------------------------------
# Hidden states of the prompt


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _reference_view(model: nn.Module, use_adapter: bool) -> contextlib.AbstractContextManager:
    """Disable PEFT adapters (read the frozen base) unless the adapter is wanted."""
    if is_peft_model(model) and not use_adapter:
        return model.disable_adapter()
    return contextlib.nullcontext()


def _taps_for(model: nn.Module, layers: Sequence[int], taps: LayerTaps | None) -> tuple[list[int], LayerTaps, bool]:
    """Resolved layer indices, the taps to use, and whether they were made here (to remove after)."""
    if taps is None:
        made = LayerTaps.for_model(model, layers)
        return list(made.keys), made, True
    if any(int(layer) < 0 for layer in layers):
        resolved = resolve_layer_indices(layers, len(find_decoder_layers(model)))
    else:
        resolved = [int(layer) for layer in layers]
    missing = [layer for layer in resolved if layer not in taps.keys]
    if missing:
        raise ProbeError(
            f"the given LayerTaps do not tap layers {missing}: build them with LayerTaps.for_model(model, {resolved})"
        )
    return resolved, taps, False


def pooled_prompt_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_length: Tensor,
    *,
    layers: Sequence[int],
    hows: Sequence[str] = ("mean",),
    taps: LayerTaps | None = None,
    use_adapter: bool = False,
) -> dict[int, dict[str, Tensor]]:
    """One no-grad, eval-mode forward on the prompt columns; pooled states per layer and pooling.

    Args:
        input_ids: [B, T] right-padded token ids.
        attention_mask: [B, T] 1 on real tokens.
        prompt_length: [B] tokens before the first assistant token (incl. the generation header).
        layers: decoder layer indices (negative allowed).
        hows: per-layer poolings to compute (``"last"``, ``"mean"``).
        taps: reusable taps covering ``layers`` (made and removed here if None).
        use_adapter: read through an active PEFT adapter instead of the base weights.

    Returns:
        ``{layer (non-negative): {how: Tensor [B, H] float32}}`` on the model's device.
    """
    resolved, taps, made_here = _taps_for(model, layers, taps)
    try:
        device = _model_device(model)
        prompt_length = torch.as_tensor(prompt_length).to(device).long()
        width = int(prompt_length.max())
        # Causal attention + right padding: prompt states do not depend on later columns.
        ids = input_ids[:, :width].to(device)
        mask = attention_mask[:, :width].to(device)
        in_prompt = prompt_token_mask(mask, prompt_length, width)
        kwargs: dict[str, Any] = {"use_cache": False}
        if supports_logits_to_keep(model):
            kwargs["logits_to_keep"] = 1  # skip most of the LM head
        with torch.no_grad(), eval_mode(model), _reference_view(model, use_adapter):
            # Ending the forward early skips the gathers and frees of a sharded model's later
            # layers, which the other ranks still run: sharded models run the whole forward.
            stop_after = None if is_sharded(model) else resolved
            with taps.capture(stop_after=stop_after) as store:
                try:
                    model(input_ids=ids, attention_mask=mask, **kwargs)
                except CaptureComplete:  # the deepest tapped layer ran: the rest is not needed
                    pass
        missing = [layer for layer in resolved if layer not in store]
        if missing:
            raise ProbeError(f"decoder layers {missing} did not run in the forward: tap layers of the model being called")
        return {layer: {how: pool_hidden(store[layer], in_prompt, prompt_length, how) for how in hows} for layer in resolved}
    finally:
        if made_here:
            taps.remove()


def extract_features(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_length: Tensor,
    *,
    layers: Sequence[int],
    pooling: str,
    taps: LayerTaps | None = None,
    use_adapter: bool = False,
) -> Tensor:
    """Probe features [B, F] float32 of a right-padded batch, from its prompt tokens only.

    Args:
        input_ids: [B, T]; attention_mask: [B, T]; prompt_length: [B] (see :func:`pooled_prompt_states`).
        layers: decoder layer indices (negative allowed, -1 = last).
        pooling: ``"last"``, ``"mean"`` or ``"mean_all_layers"``.
        taps: optional reusable :class:`LayerTaps` covering ``layers``.
        use_adapter: read through an active PEFT adapter instead of the base (reference) weights.
    """
    _check_pooling(pooling)
    pooled = pooled_prompt_states(
        model, input_ids, attention_mask, prompt_length,
        layers=layers, hows=_per_layer_poolings(pooling), taps=taps, use_adapter=use_adapter,
    )
    return combine_layers(pooled, list(pooled), pooling)


# ---------------------------------------------------------------------------------------------
# Prompts -> features


def render_prompt(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as one user turn plus the generation header (the "pre-generation" tokens)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return render_ids(messages, tokenizer, add_generation_prompt=True)


def _prompt_batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int, system_prompt: str | None
) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor]]:
    """Batches (row indices, input_ids [B, T], attention_mask [B, T], prompt_length [B]), longest first.

    Sorting by length keeps padding (wasted compute) small; the indices restore the order.
    """
    if batch_size < 1:
        raise ProbeError(f"batch_size is {batch_size}: use a positive number of prompts per batch")
    require_chat_template(tokenizer)
    pad = resolve_pad_token_id(tokenizer)
    encoded = [render_prompt(tokenizer, prompt, system_prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        yield rows, ids, mask, mask.sum(1)


def _progress(iterable: Iterator, total: int, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr)


def featurize_pooled(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    layers: Sequence[int],
    hows: Sequence[str],
    batch_size: int = 16,
    system_prompt: str | None = None,
    use_adapter: bool = False,
    progress: bool = False,
) -> dict[int, dict[str, Tensor]]:
    """Per-layer pooled states ``{layer: {how: [N, H]}}`` (CPU, float32), one forward per batch."""
    prompts = list(prompts)
    if not prompts:
        raise ProbeError("no prompts to featurize: pass at least one prompt")
    resolved = resolve_layer_indices(layers, len(find_decoder_layers(model)))
    out: dict[int, dict[str, Tensor]] = {}
    batches = _prompt_batches(tokenizer, prompts, batch_size, system_prompt)
    with LayerTaps.for_model(model, resolved) as taps:
        total = math.ceil(len(prompts) / batch_size)
        for rows, ids, mask, lengths in _progress(batches, total, progress, "probe features"):
            pooled = pooled_prompt_states(
                model, ids, mask, lengths, layers=resolved, hows=hows, taps=taps, use_adapter=use_adapter
            )
            index = torch.tensor(rows)
            for layer, by_how in pooled.items():
                for how, values in by_how.items():
                    target = out.setdefault(layer, {}).get(how)
                    if target is None:
                        target = out[layer][how] = torch.empty(len(prompts), values.shape[-1])
                    target[index] = values.float().cpu()
    return out


def featurize_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    layers: Sequence[int],
    pooling: str,
    batch_size: int = 16,
    system_prompt: str | None = None,
    use_adapter: bool = False,
    progress: bool = False,
) -> Tensor:
    """Probe features [N, F] (CPU, float32) of prompts rendered as a single user turn + generation header."""
    _check_pooling(pooling)
    resolved = resolve_layer_indices(layers, len(find_decoder_layers(model)))
    pooled = featurize_pooled(
        model, tokenizer, prompts, layers=resolved, hows=_per_layer_poolings(pooling),
        batch_size=batch_size, system_prompt=system_prompt, use_adapter=use_adapter, progress=progress,
    )
    return combine_layers(pooled, resolved, pooling)


# ---------------------------------------------------------------------------------------------
# Classifier and its training


class ProbeClassifier(nn.Module):
    """Standardise features, then a logistic (F -> 1) or MLP (F -> hidden -> ReLU -> dropout -> 1) head.

    The standardiser's ``mean``/``std`` [F] are buffers fitted on the training split only.
    """

    def __init__(self, num_features: int, kind: ProbeKind = "logistic", hidden: int = 64, dropout: float = 0.1) -> None:
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
    kind: ProbeKind = "logistic",
    hidden: int = 64,
    dropout: float = 0.1,
    weight_decay: float = 1e-2,
    lr: float = 1e-2,
    epochs: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
    balance: bool = True,
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


# ---------------------------------------------------------------------------------------------
# Which model a probe belongs to

_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "attn_implementation",
})
_SAMPLE = 16  # values hashed from each end of every parameter


def _stable_config(value: Any) -> Any:
    """Config without runtime or provenance fields (keys starting with '_' included, e.g. _name_or_path)."""
    if isinstance(value, Mapping):
        return {
            str(key): _stable_config(item)
            for key, item in value.items()
            if str(key) not in _VOLATILE_CONFIG_KEYS and not str(key).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(item) for item in value]
    return value


def _base_parameter_name(name: str) -> str | None:
    """The parameter's name in the unwrapped model, or None for a PEFT adapter's own parameter."""
    parts = name.split(".")
    if any(part.startswith("lora_") or part == "modules_to_save" for part in parts):
        return None
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft_model(model) else model


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the base model's config, parameter names/shapes, and sampled weight values.

    Contents: the config JSON (sorted keys, without volatile fields such as ``_name_or_path``,
    ``transformers_version``, ``dtype``), then for every base parameter (PEFT adapter weights
    skipped, PEFT wrapper names undone) its name, shape, and its first and last 16 values rounded
    to bfloat16. Cheap (no full pass over the weights); any fine-tuning of the base changes it; the
    same weights held in float32 or bfloat16 give the same fingerprint; a LoRA adapter does not.
    A model sharded by FSDP2 gathers each parameter once (all ranks must call this together).
    """
    base = _base_model(model)
    hasher = hashlib.sha256()
    config = getattr(base, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    hasher.update(json.dumps(_stable_config(config_dict), sort_keys=True, default=str).encode())
    for name, parameter in base.named_parameters():
        clean = _base_parameter_name(name)
        if clean is None:
            continue
        hasher.update(f"{clean}:{tuple(parameter.shape)};".encode())
        if parameter.is_meta or parameter.numel() == 0:
            continue
        value = parameter.detach()
        if hasattr(value, "full_tensor"):  # a sharded DTensor (FSDP2): every rank gathers it together
            value = value.full_tensor()
        flat = value.reshape(-1)
        sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).to("cpu", torch.bfloat16).float()
        hasher.update(repr(sample.tolist()).encode())
    return hasher.hexdigest()


def model_structure(model: nn.Module) -> tuple[int, int]:
    """(number of decoder layers, hidden size) of a causal LM."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_config, "hidden_size", None)
    if hidden is None:
        hidden = base.get_input_embeddings().weight.shape[-1]
    return len(find_decoder_layers(model)), int(hidden)


def _default_model_name(model: nn.Module) -> str:
    config = getattr(_base_model(model), "config", None)
    return str(getattr(config, "_name_or_path", "") or type(_base_model(model)).__name__)


# ---------------------------------------------------------------------------------------------
# The probe artifact


def _write_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


@dataclass
class ActivationProbe:
    """A trained probe and what it needs to be used safely: which model, layers and pooling.

    Attributes:
        classifier: the trained :class:`ProbeClassifier`.
        model_name: name or path of the model it was trained on (for messages).
        fingerprint: :func:`model_fingerprint` of that model.
        layers: non-negative decoder layer indices read.
        pooling: ``"last"``, ``"mean"`` or ``"mean_all_layers"``.
        hidden_size, num_layers: the model's shape (checked before the fingerprint).
        threshold: flag prompts scoring >= threshold (0.5, or calibrated by :meth:`calibrate`).
        metrics: training metrics (see :func:`train_probe`).
        calibration: :class:`CalibratedThreshold` fields, or None.
        system_prompt: system message used when rendering prompts (None = the template's default).
    """

    classifier: ProbeClassifier
    model_name: str
    fingerprint: str
    layers: list[int]
    pooling: str
    hidden_size: int
    num_layers: int
    threshold: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    system_prompt: str | None = None

    def score(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt_length: Tensor,
        taps: LayerTaps | None = None,
        use_adapter: bool = False,
    ) -> Tensor:
        """Harmful probabilities [B] (float32, on ``input_ids``' device) of a right-padded batch."""
        features = extract_features(
            model, input_ids, attention_mask, prompt_length,
            layers=self.layers, pooling=self.pooling, taps=taps, use_adapter=use_adapter,
        )
        self.classifier.to(features.device)
        return self.classifier.predict_proba(features).to(input_ids.device)

    def score_prompts(
        self, model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False
    ) -> Tensor:
        """Harmful probabilities [N] (CPU) of prompts, each rendered as a single user turn."""
        features = featurize_prompts(
            model, tokenizer, prompts, layers=self.layers, pooling=self.pooling,
            batch_size=batch_size, system_prompt=self.system_prompt, progress=progress,
        )
        self.classifier.to("cpu")
        return self.classifier.predict_proba(features)

    def calibrate(
        self, harmful_scores: Tensor, benign_scores: Tensor | None = None, alpha: float = 0.1, delta: float = 0.05
    ) -> CalibratedThreshold:
        """Set ``threshold`` from held-out harmful scores with a recall guarantee (see calibration.py)."""
        result = calibrate_threshold(harmful_scores, alpha=alpha, delta=delta, benign_scores=benign_scores)
        self.threshold, self.calibration = result.threshold, result.to_dict()
        return result

    def metadata(self) -> dict[str, Any]:
        """Everything but the classifier weights (JSON-serialisable)."""
        return {
            "format": PROBE_FORMAT,
            "version": PROBE_VERSION,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "layers": [int(layer) for layer in self.layers],
            "pooling": self.pooling,
            "hidden_size": int(self.hidden_size),
            "num_layers": int(self.num_layers),
            "threshold": float(self.threshold),
            "metrics": self.metrics,
            "calibration": self.calibration,
            "system_prompt": self.system_prompt,
            "classifier": self.classifier.config(),
        }

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``probe.safetensors`` + ``probe.json`` into ``folder``, all or nothing."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise ProbeError(f"{folder} already exists: choose a new folder or pass overwrite=True")
        staging = folder if not folder.exists() else folder.with_name(f".{folder.name}.replace-{os.getpid()}")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.classifier.state_dict().items()}
        with atomic_directory(staging) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE))
            _write_metadata(tmp / METADATA_FILE, self.metadata())
        if staging != folder:  # overwrite: swap in the finished folder, then drop the old one
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> ActivationProbe:
        """Read a saved probe; with ``model``, refuse one trained on a different model.

        Raises:
            ProbeError: missing or unreadable files.
            ProbeMismatchError: the model's layers, hidden size or fingerprint differ.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / METADATA_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ProbeError(
                f"no probe at {folder} ({METADATA_FILE} or {WEIGHTS_FILE} missing): "
                "pass a folder written by ActivationProbe.save or `lightning-safety probe fit`"
            )
        try:
            meta = json.loads((folder / METADATA_FILE).read_text())
        except (OSError, ValueError) as error:
            raise ProbeError(f"{folder / METADATA_FILE} is unreadable ({error}): save the probe again") from error
        if meta.get("format") != PROBE_FORMAT or int(meta.get("version", 0)) > PROBE_VERSION:
            raise ProbeError(
                f"{folder / METADATA_FILE} is not a version <= {PROBE_VERSION} activation probe: "
                "save it with this version of lightning-safety"
            )
        classifier = ProbeClassifier(**meta["classifier"])
        classifier.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        classifier.eval()
        probe = cls(
            classifier=classifier,
            model_name=meta["model_name"],
            fingerprint=meta["fingerprint"],
            layers=[int(layer) for layer in meta["layers"]],
            pooling=meta["pooling"],
            hidden_size=int(meta["hidden_size"]),
            num_layers=int(meta["num_layers"]),
            threshold=float(meta["threshold"]),
            metrics=meta.get("metrics") or {},
            calibration=meta.get("calibration"),
            system_prompt=meta.get("system_prompt"),
        )
        if model is not None:
            probe.check_model(model, where=str(folder))
        return probe

    def check_model(self, model: nn.Module, where: str = "this probe") -> None:
        """Raise :class:`ProbeMismatchError` unless ``model`` is the one the probe was trained on."""
        fix = "train a probe for this model with `lightning-safety probe fit`"
        num_layers, hidden_size = model_structure(model)
        if (num_layers, hidden_size) != (self.num_layers, self.hidden_size):
            raise ProbeMismatchError(
                f"probe at {where} was trained on model '{self.model_name}' with {self.num_layers} layers and "
                f"hidden size {self.hidden_size}, not this model ({num_layers} layers, hidden size {hidden_size}): {fix}"
            )
        fingerprint = model_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise ProbeMismatchError(
                f"probe at {where} was trained on model '{self.model_name}' (fingerprint {self.fingerprint[:12]}...), "
                f"not this model ({fingerprint[:12]}...): {fix}"
            )


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
    kind: ProbeKind = "logistic",
    hidden: int = 64,
    dropout: float = 0.1,
    weight_decay: float = 1e-2,
    lr: float = 1e-2,
    epochs: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
    balance: bool = True,
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


# ---------------------------------------------------------------------------------------------
# Layer / pooling sweep


def sweep(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    layers: str | Sequence[int] = "all",
    poolings: Sequence[str] = ("last", "mean"),
    include_mean_all_layers: bool = True,
    ood: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    epochs: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Logistic probes for every (layer, pooling), plus ``mean_all_layers``, from one featurization.

    Each prompt set is run once, capturing every swept layer per forward. Every probe uses the
    same seeded stratified validation split.

    Args:
        layers: ``"all"`` or decoder layer indices.
        poolings: per-layer poolings, among ``"last"`` and ``"mean"``.
        ood: name -> (harmful prompts, benign prompts) scored by every probe (AUROC only).

    Returns:
        One row per probe: ``layer`` (int, or None for mean_all_layers), ``pooling``,
        ``val_auroc``, ``train_auroc``, ``recall_at_1pct_fpr``, ``recall_at_5pct_fpr`` (validation
        split) and ``ood_auroc`` (name -> AUROC).
    """
    for pooling in poolings:
        if pooling not in ("last", "mean"):
            raise ProbeError(f"sweep pooling '{pooling}' is not per-layer: use 'last' and/or 'mean'")
    num_layers, _ = model_structure(model)
    if isinstance(layers, str):
        if layers != "all":
            raise ProbeError(f"layers='{layers}' is not understood: pass 'all' or a list of layer indices")
        layers = list(range(num_layers))
    resolved = resolve_layer_indices(layers, num_layers)
    hows = tuple(dict.fromkeys([*poolings, *(["mean"] if include_mean_all_layers else [])]))

    def featurize(prompts: Sequence[str]) -> dict[int, dict[str, Tensor]]:
        return featurize_pooled(
            model, tokenizer, prompts, layers=resolved, hows=hows,
            batch_size=batch_size, system_prompt=system_prompt, progress=progress,
        )

    def with_labels(harm: Sequence[str], ben: Sequence[str]) -> tuple[dict[int, dict[str, Tensor]], Tensor]:
        labels = torch.cat([torch.ones(len(harm)), torch.zeros(len(ben))])
        return featurize(list(harm) + list(ben)), labels

    main, labels = with_labels(harmful, benign)
    ood_sets = {name: with_labels(harm, ben) for name, (harm, ben) in (ood or {}).items()}
    _, val_idx = stratified_split(labels, val_fraction, seed)

    configs: list[tuple[int | None, str, list[int]]] = [(layer, p, [layer]) for layer in resolved for p in poolings]
    if include_mean_all_layers:
        configs.append((None, "mean_all_layers", resolved))
    rows = []
    for layer, pooling, used in configs:
        features = combine_layers(main, used, pooling)
        classifier, metrics = train_probe(
            features, labels, kind="logistic", weight_decay=weight_decay,
            lr=lr, epochs=epochs, val_fraction=val_fraction, seed=seed,
        )
        val_scores = ranking_scores(classifier, features[val_idx])
        row = {
            "layer": layer,
            "pooling": pooling,
            "val_auroc": metrics["val_auroc"],
            "train_auroc": metrics["train_auroc"],
            "recall_at_1pct_fpr": recall_at_fpr(val_scores, labels[val_idx], 0.01) if val_idx.numel() else None,
            "recall_at_5pct_fpr": recall_at_fpr(val_scores, labels[val_idx], 0.05) if val_idx.numel() else None,
            "ood_auroc": {
                name: auroc(ranking_scores(classifier, combine_layers(pooled, used, pooling)), ood_labels)
                for name, (pooled, ood_labels) in ood_sets.items()
            },
        }
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`sweep` rows (one column per OOD set)."""
    ood_names = list(dict.fromkeys(name for row in rows for name in row.get("ood_auroc", {})))
    header = ["layer", "pooling", "val AUROC", "recall@1%FPR", "recall@5%FPR", *[f"AUROC {n}" for n in ood_names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            "all" if row["layer"] is None else str(row["layer"]),
            row["pooling"],
            _cell(row.get("val_auroc")),
            _cell(row.get("recall_at_1pct_fpr")),
            _cell(row.get("recall_at_5pct_fpr")),
            *[_cell(row.get("ood_auroc", {}).get(name)) for name in ood_names],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """PNG of validation AUROC vs layer, one line per pooling (OOD AUROC dashed); mean_all_layers as a level line."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend switch, no display needed
    except ImportError as error:
        raise ProbeError("plotting the sweep needs matplotlib: pip install 'lightning-safety[plots]'") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    ood_names = list(dict.fromkeys(name for row in rows for name in row.get("ood_auroc", {})))
    for pooling in dict.fromkeys(row["pooling"] for row in rows if row["layer"] is not None):
        subset = sorted((row for row in rows if row["pooling"] == pooling and row["layer"] is not None), key=lambda r: r["layer"])
        line = axes.plot([r["layer"] for r in subset], [r["val_auroc"] for r in subset], marker="o", label=f"{pooling} (val)")
        for name in ood_names:
            axes.plot(
                [r["layer"] for r in subset], [r["ood_auroc"].get(name) for r in subset],
                linestyle="--", color=line[0].get_color(), alpha=0.7, label=f"{pooling} ({name})",
            )
    for row in rows:
        if row["layer"] is None and row.get("val_auroc") is not None:
            axes.axhline(row["val_auroc"], color="gray", linestyle=":", label=f"{row['pooling']} (val)")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("AUROC")
    axes.set_title("Activation probe: harmful vs benign prompts")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)  # a Figure without pyplot renders PNG with the Agg canvas
    return path


__all__ = [
    "POOLINGS",
    "ActivationProbe",
    "ProbeClassifier",
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
    "render_prompt",
    "stratified_split",
    "sweep",
    "sweep_table",
    "train_probe",
]
