"""Log-probabilities of a few short continuations after many prompts, each prompt run once.

Scoring K short continuations (refusal openers, label words) after B prompts naively takes B x K
sequences of prompt + continuation, and a log-softmax over the vocabulary at every position.
Here each prompt runs once, its output layer at the last position only (the first token of every
continuation is read there), and the rest of every continuation runs from the prompt's KV cache:
the prompt tokens, the bulk of the work, are computed once. Used by
:func:`~lightning_safety.risk.refusal.refusal_probability` and the utility tasks' label scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.data.padding import pad_batch
from lightning_safety.errors import DataError
from lightning_safety.models import accepts_argument, eval_mode

__all__ = ["continuation_log_probs"]


@torch.no_grad()
def continuation_log_probs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    prompts_per_forward: int = 16,
    reuse_prompt: bool = True,
) -> Tensor:
    """log P(continuation k | prompt b) under ``model``: float32 [B, K] on the CPU.

    Args:
        model: a causal LM (called as it is: switch adapters off around the call if needed).
        prompts: B token-id sequences, each ending where the continuation's first token goes.
        continuations: K non-empty token-id sequences.
        pad_id: the id written into padding (masked out).
        prompts_per_forward: prompts per forward (each with its K continuations).
        reuse_prompt: continue each prompt from its KV cache; False, or a model without a KV
            cache: one forward of every (prompt + continuation) sequence. Both give the same numbers.

    Prompts are left-padded with explicit position ids, so each row computes what it would compute alone.
    """
    if any(len(p) == 0 for p in prompts):
        raise DataError("a prompt has no tokens: give every prompt its text before the continuation")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise DataError("continuations must be a non-empty list of non-empty token-id sequences")
    if not prompts:
        return torch.zeros(0, len(continuations))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    keep = accepts_argument(model, "logits_to_keep")
    out = []
    with eval_mode(model):
        for start in range(0, len(prompts), max(1, prompts_per_forward)):
            chunk = prompts[start : start + max(1, prompts_per_forward)]
            scored = _with_prompt_cache(model, chunk, continuations, pad_id, device, keep) if reuse_prompt else None
            if scored is None:
                scored = _one_sequence_each(model, chunk, continuations, pad_id, device, keep)
            out.append(scored)
    return torch.cat(out)


def _gather(log_probs: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Sum over t < lengths of log_probs[n, t, tokens[n, t]]: [N, L, V], [N, L], [N] -> [N]."""
    picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths.unsqueeze(1)
    return (picked * valid).sum(dim=1)


def _table(continuations: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Continuations right-padded into [K, L] token ids (0 on padding) and their lengths [K]."""
    longest = max(len(c) for c in continuations)
    table = torch.zeros(len(continuations), longest, dtype=torch.long, device=device)
    for k, continuation in enumerate(continuations):
        table[k, : len(continuation)] = torch.tensor(list(continuation), device=device)
    return table, torch.tensor([len(c) for c in continuations], device=device)


def _with_prompt_cache(model: nn.Module, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                       pad_id: int, device: torch.device, keep: bool) -> Tensor | None:
    """[B, K]: one prompt forward, then every continuation from the prompt's KV cache (None: no cache)."""
    batch, count = len(prompts), len(continuations)
    padded = pad_batch(prompts, pad_id, side="left", device=device)
    mask = padded["attention_mask"]
    kwargs: dict[str, Any] = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": True}
    if keep:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=padded["input_ids"], attention_mask=mask, **kwargs)
    # transformers 5 names the KV cache `cache` (argument and output); earlier versions `past_key_values`.
    cache_argument = "cache" if accepts_argument(model, "cache") else "past_key_values"
    cache = getattr(out, cache_argument, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    first = out.logits[:, -1].float().log_softmax(-1)  # [B, V]: the continuation's first token
    table, lengths = _table(continuations, device)  # [K, L], [K]
    total = first[:, table[:, 0]]  # [B, K]
    if table.shape[1] == 1:
        return total.cpu()
    cache.batch_repeat_interleave(count)  # row b*K + k continues prompt b with continuation k
    inputs = table[:, :-1].repeat(batch, 1)  # [B*K, L-1]: each continuation's tokens but its last
    steps = inputs.shape[1]
    full_mask = torch.cat([mask.repeat_interleave(count, dim=0), torch.ones_like(inputs)], dim=1)
    positions = mask.sum(-1).repeat_interleave(count).unsqueeze(1) + torch.arange(steps, device=device)
    logits = model(input_ids=inputs, attention_mask=full_mask, position_ids=positions, use_cache=False,
                   **{cache_argument: cache}).logits  # [B*K, L-1, V]: predicts tokens 1..L-1
    rest = _gather(logits.float().log_softmax(-1), table[:, 1:].repeat(batch, 1), (lengths - 1).repeat(batch))
    return (total + rest.view(batch, count)).cpu()


def _one_sequence_each(model: nn.Module, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                       pad_id: int, device: torch.device, keep: bool) -> Tensor:
    """[B, K] from one left-padded forward of every (prompt + continuation) sequence."""
    table, lengths = _table(continuations, device)
    longest = table.shape[1]
    # Left padding puts every continuation in the last columns: the last `longest` + 1 positions hold what is read.
    sequences = [list(p) + list(c) for p in prompts for c in continuations]
    padded = pad_batch(sequences, pad_id, side="left", device=device)
    mask = padded["attention_mask"]
    kwargs: dict[str, Any] = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if keep:
        kwargs["logits_to_keep"] = longest + 1
    logits = model(input_ids=padded["input_ids"], attention_mask=mask, **kwargs).logits[:, -(longest + 1):]
    log_probs = logits.float().log_softmax(-1)[:, :-1]  # [B*K, longest, V]: column j predicts column T - longest + j
    # Each continuation right-aligned in `longest` columns: continuation k fills its last lengths[k].
    count = len(continuations)
    shift = (longest - lengths).unsqueeze(1)  # [K, 1]
    columns = torch.arange(longest, device=device).unsqueeze(0)  # [1, longest]
    aligned = table.gather(1, (columns - shift).clamp(min=0))  # [K, longest]
    valid = columns >= shift
    picked = log_probs.gather(-1, aligned.repeat(len(prompts), 1).unsqueeze(-1)).squeeze(-1)  # [B*K, longest]
    picked = torch.where(valid.repeat(len(prompts), 1), picked, torch.zeros_like(picked))
    return picked.sum(dim=1).view(len(prompts), count).cpu()
