"""Probe features: a frozen model's hidden states on the prompt, pooled into one vector per prompt.

Only the prompt is read, everything before the assistant's first token including the generation
header (``prompt_length`` of a training example). Poolings:

* ``"last"``: the hidden state at the last prompt token (index ``prompt_length - 1``);
* ``"mean"``: the mean over the prompt tokens (padding excluded);
* ``"mean_all_layers"``: the authors' choice, mean-pooled states averaged over the given layers
  (H features). With several layers, ``"last"``/``"mean"`` concatenate them (len(layers) * H).

Under PEFT the features come from the base weights (adapter disabled) unless ``use_adapter=True``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.data.formatting import render_ids, require_chat_template, resolve_pad_token_id
from lightning_safety.data.padding import pad_batch
from lightning_safety.distributed import is_sharded
from lightning_safety.errors import ProbeError
from lightning_safety.models import eval_mode, is_peft_model, supports_logits_to_keep
from lightning_safety.risk.hooks import CaptureComplete, LayerTaps, find_decoder_layers, resolve_layer_indices

POOLINGS = ("last", "mean", "mean_all_layers")


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
        padded = pad_batch([encoded[i] for i in rows], pad)
        mask = padded["attention_mask"]
        yield rows, padded["input_ids"], mask, mask.sum(1)


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


__all__ = [
    "POOLINGS",
    "combine_layers",
    "extract_features",
    "featurize_pooled",
    "featurize_prompts",
    "pool_hidden",
    "pooled_prompt_states",
    "prompt_token_mask",
    "render_prompt",
]
