"""Chat-template tokenisation with labels on the assistant tokens only, and truncation.

Labels are found incrementally, which works for any prefix-stable chat template, including
ones that insert a default system message (SmolLM2, Qwen2.5) or a date header (Llama 3.1):
for each assistant message ``i``, ``prefix = template(messages[:i], add_generation_prompt=True)``
and ``full = template(messages[:i + 1])``; the assistant tokens are ``full[len(prefix):]``. The
tokens of the example are the rendering of the whole conversation; every assistant span is
labelled. The end-of-turn token (e.g. ``<|im_end|>``) is labelled so the model learns to stop;
whitespace the template writes after it (ChatML's newline) is not, since it is never generated.

Truncation policy: a sequence longer than ``max_length`` keeps its first ``max_length`` tokens.
The end is dropped, so a long response is cut at its end and the prompt stays whole. If that
leaves no labelled token (the prompt alone fills ``max_length``), the row is an error rather
than a silent no-op example.

Padding: the pad id is ``tokenizer.pad_token_id``, or ``eos_token_id`` when the tokenizer has no
pad token (the tokenizer is not modified). Padded positions are masked out of attention and
labels, so the value does not matter to the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_safety.errors import DataError

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (prompt, template, padding)."""


def has_chat_template(tokenizer: Any, chat_template: str | None = None) -> bool:
    """Whether a chat template is available (given explicitly or set on the tokenizer)."""
    return bool(chat_template) or bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, chat_template: str | None = None) -> None:
    """Raise :class:`DataError` unless a chat template is available."""
    if not has_chat_template(tokenizer, chat_template):
        raise DataError(
            "tokenizer has no chat template: set data.chat_template (a Jinja string) "
            "or use an instruction-tuned tokenizer"
        )


def render_ids(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Any,
    *,
    add_generation_prompt: bool,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of ``messages`` rendered through the chat template (a plain list of ints)."""
    result = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    # transformers 5 returns a BatchEncoding unless return_dict=False is honoured; accept both.
    if isinstance(result, Mapping):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], list):  # some versions batch a single conversation
        result = result[0]
    return [int(token) for token in result]


def _trim_trailing_whitespace(ids: Sequence[int], start: int, end: int, tokenizer: Any) -> int:
    """End of the span after dropping trailing whitespace-only tokens (text after the end-of-turn)."""
    while end - start > 1 and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end


def _not_prefix_stable(where: str) -> DataError:
    return DataError(
        f"{where}: the chat template is not prefix-stable (rendering the conversation up to a reply changes "
        "earlier tokens), so reply tokens cannot be located; pass a prefix-stable data.chat_template"
    )


def tokenize_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Any,
    *,
    max_length: int,
    chat_template: str | None = None,
    where: str = "conversation",
) -> dict[str, Any]:
    """Tokenise a conversation with labels on assistant tokens only (see the module docstring).

    Args:
        messages: Chat messages with at least one assistant turn.
        tokenizer: A Hugging Face tokenizer.
        max_length: Keep at most this many tokens (the end is dropped).
        chat_template: Jinja template overriding the tokenizer's own.
        where: How to name the example in error messages (e.g. ``"row 5 (id ab12...)"``).

    Returns:
        ``input_ids`` (list[int], length T <= max_length), ``labels`` (list[int], length T,
        ``-100`` except on assistant tokens), ``prompt_length`` (int: tokens before the first
        assistant token, i.e. the prompt with its generation header, what a probe reads) and
        ``truncated`` (bool: whether tokens were dropped).

    Raises:
        DataError: No chat template, a template that is not prefix-stable, no assistant turn,
            or a response truncated away entirely.
    """
    require_chat_template(tokenizer, chat_template)
    if max_length < 1:
        raise DataError(f"max_length is {max_length}; set data.max_length to a positive number of tokens")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where} has no assistant turn; give every training row an assistant answer or drop it")

    def render(upto: int, generation: bool) -> list[int]:
        try:
            return render_ids(messages[:upto], tokenizer, add_generation_prompt=generation, chat_template=chat_template)
        except DataError:
            raise
        except Exception as error:  # Jinja errors, e.g. a template that rejects this role order
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"{where}: the chat template failed: {first}; fix the roles or pass data.chat_template"
            ) from error

    ids = render(len(messages), False)
    labels = [IGNORE_INDEX] * len(ids)
    prompt_length = 0
    for number, turn in enumerate(turns):
        prefix = render(turn, True)
        full = ids if turn == len(messages) - 1 else render(turn + 1, False)
        if full[: len(prefix)] != prefix or ids[: len(full)] != full:
            raise _not_prefix_stable(where)
        start = len(prefix)
        end = _trim_trailing_whitespace(full, start, len(full), tokenizer)
        labels[start:end] = full[start:end]
        if number == 0:
            prompt_length = start

    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(
            f"{where}: the response is truncated away entirely (prompt is {prompt_length} tokens, "
            f"max_length {max_length}): raise data.max_length or shorten the prompt"
        )
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length, "truncated": truncated}


def resolve_pad_token_id(tokenizer: Any) -> int:
    """``pad_token_id``, else ``eos_token_id`` (documented fallback); error if neither exists."""
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise DataError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before training")
