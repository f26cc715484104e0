"""Batched greedy generation for any Hugging Face causal LM (the policy in our module or a user's).

Prompts are rendered through the chat template (as in training), sorted by length so that a batch
holds prompts of similar length, left-padded (new tokens then line up at the right edge for every
row) and decoded with the KV cache. Generation stops at the end-of-turn / EOS tokens or after
``max_new_tokens``; the decoded responses come back in the order of the prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.data.formatting import render_ids, require_chat_template, resolve_pad_token_id
from lightning_safety.data.padding import pad_batch
from lightning_safety.errors import LightningSafetyError
from lightning_safety.models import eval_mode

Prompt = str | Sequence[Mapping[str, str]]
"""A user request (wrapped as one user message) or a whole conversation ending before the answer."""


class GenerationError(LightningSafetyError):
    """Generation settings or inputs are invalid."""


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated for evaluation.

    Args:
        max_new_tokens: most tokens generated per response.
        batch_size: prompts per ``generate`` call (sorted by length first).
        do_sample: sample instead of greedy decoding (greedy is the standard for ASR).
        temperature: sampling temperature (only with ``do_sample``).
        top_p: nucleus sampling mass (only with ``do_sample``).
        system_prompt: system message put before every prompt (None: the template's default).
        chat_template: a Jinja template that replaces the tokenizer's own.
        max_prompt_tokens: prompts longer than this keep their last tokens (None: no limit).
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    system_prompt: str | None = None
    chat_template: str | None = None
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} is invalid: use a positive integer")
        if int(self.batch_size) < 1:
            raise GenerationError(f"generation batch_size={self.batch_size} is invalid: use a positive integer")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise GenerationError("sampling needs temperature > 0 and 0 < top_p <= 1")
        if self.max_prompt_tokens is not None and int(self.max_prompt_tokens) < 1:
            raise GenerationError(f"max_prompt_tokens={self.max_prompt_tokens} is invalid: use a positive integer or None")


def prompt_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a prompt: a string becomes one user turn, after an optional system turn."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(message) for message in prompt]
        if not messages or messages[-1].get("role") != "user":
            raise GenerationError("a conversation prompt must end with a user message: drop the assistant answer")
    if system_prompt is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer, plus a chat end-of-turn token."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        ids.extend(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    # ChatML / Llama 3 / Gemma end-of-turn markers: a chat model ends its answer with them even when
    # the configured EOS is another token.
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if marker in vocabulary:
            ids.append(int(vocabulary[marker]))
    unique = list(dict.fromkeys(int(i) for i in ids))
    if not unique:
        raise GenerationError("the model and tokenizer name no EOS token: set tokenizer.eos_token so generation can stop")
    return unique


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _new_tokens(row: Tensor, stops: set[int]) -> list[int]:
    """Generated ids up to (not including) the first stop token."""
    tokens: list[int] = []
    for token in row.tolist():
        if token in stops:
            break
        tokens.append(token)
    return tokens


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    synced: bool = False,
) -> list[str]:
    """Generate one response per prompt, batched, in the order of ``prompts``.

    Args:
        model: a Hugging Face causal LM (PEFT-wrapped or not); switched to eval mode during the
            call and restored afterwards.
        tokenizer: its tokenizer, with a chat template (or ``settings.chat_template``).
        prompts: user requests (strings) or conversations (lists of messages ending with a user turn).
        settings: decoding settings (greedy, 64 new tokens, batches of 16 by default).
        progress: called with the number of prompts finished after each batch (for progress bars).
        synced: the model is sharded across ranks (FSDP): every rank keeps running forwards until
            all ranks' batches are done (``generate(synced_gpus=True)``). Every rank must then
            call this with the same number of prompts.

    Returns:
        The decoded responses (special tokens removed, surrounding whitespace stripped); an empty
        string where the model stopped at once.
    """
    settings = settings or GenerationSettings()
    if isinstance(prompts, str):
        raise GenerationError("generate_responses takes a list of prompts, got one string: wrap it in a list")
    require_chat_template(tokenizer, settings.chat_template)
    rendered = [
        render_ids(prompt_messages(p, settings.system_prompt), tokenizer, add_generation_prompt=True,
                   chat_template=settings.chat_template)
        for p in prompts
    ]
    if settings.max_prompt_tokens is not None:
        rendered = [ids[-settings.max_prompt_tokens :] for ids in rendered]
    pad_id = resolve_pad_token_id(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    device = _model_device(model)
    config = _generation_config(model, settings, pad_id, stops)
    # Longest first: an out-of-memory error shows on the first batch, not after minutes.
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]), reverse=True)
    responses: list[str] = [""] * len(rendered)
    with eval_mode(model):
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            padded = pad_batch([rendered[i] for i in rows], pad_id, side="left", device=device)
            ids = padded["input_ids"]
            output = model.generate(**padded, generation_config=config, synced_gpus=synced)
            for row, sequence in zip(rows, output[:, ids.shape[1] :]):
                text = tokenizer.decode(_new_tokens(sequence, set(stops)), skip_special_tokens=True)
                responses[row] = text.strip()
            if progress is not None:
                progress(len(rows))
    return responses


def _generation_config(model: nn.Module, settings: GenerationSettings, pad_id: int, stops: list[int]) -> Any:
    """A fresh GenerationConfig: the model's own may carry sampling defaults that greedy would warn about."""
    from transformers import GenerationConfig  # lazy: transformers takes seconds, and the CLI imports this module

    options: dict[str, Any] = {
        "max_new_tokens": int(settings.max_new_tokens),
        "do_sample": bool(settings.do_sample),
        "pad_token_id": pad_id,
        "eos_token_id": stops,
        "use_cache": True,
    }
    if settings.do_sample:
        options.update(temperature=float(settings.temperature), top_p=float(settings.top_p))
    return GenerationConfig(**options)
