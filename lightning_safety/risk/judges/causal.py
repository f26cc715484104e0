"""Judges that read one next-token distribution of a causal LM: rubric judges and guard models.

Neither samples: the score is a function of the logits at the position after the judge prompt,
so it is deterministic and cheap (one forward pass per example, no decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.data.padding import pad_batch
from lightning_safety.errors import JudgeError
from lightning_safety.models import accepts_argument, eval_mode, load_causal_lm, load_tokenizer
from lightning_safety.risk.judges.base import Judge
from lightning_safety.risk.judges.rubric import DEFAULT_RUBRIC, RATING_PRIMER, rubric_message
from lightning_safety.risk.text import sanitize_for_judge

_TRIM_MARK = " [...] "
_TRIM_SLACK = 8  # tokens of margin when shortening text (re-encoding a cut text can drift)
_PROBE_TEXT = "Example request."  # stand-in example used to inspect the rendered prompt


def model_label(model: Any) -> str:
    if isinstance(model, str):
        return model.rstrip("/").rsplit("/", 1)[-1]
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(path).rstrip("/").rsplit("/", 1)[-1] or type(model).__name__


def load_judge_tokenizer(model: Any, tokenizer: Any) -> Any:
    """The given tokenizer, or the one saved with ``model`` (a name, or a model's ``name_or_path``)."""
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    source = model if isinstance(model, str) else getattr(model, "name_or_path", "")
    if not source:
        raise JudgeError(
            f"no tokenizer for the judge model {type(model).__name__}: pass tokenizer=..., or the model "
            "by name or folder"
        )
    return load_tokenizer(str(source))


def resolve_device(model: nn.Module, device: str | torch.device | None, loaded_here: bool) -> torch.device:
    """Move ``model`` only when asked, or when this judge loaded it (then to CUDA if present)."""
    if device is None and loaded_here:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        model.to(device)
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class CausalLMJudge(Judge):
    """Shared machinery: load model + tokenizer, render a chat prompt, next-token logits.

    Batches are left-padded with explicit position ids, so each row's last position (the one
    whose logits are read) sees exactly what it would see alone. Example text is shortened in
    the middle (keeping its start and end) when the rendered prompt exceeds ``max_length``.
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        *,
        batch_size: int,
        max_length: int,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.tokenizer = load_judge_tokenizer(model, tokenizer)
        if not getattr(self.tokenizer, "chat_template", None):
            raise JudgeError(
                f"the judge tokenizer of '{model_label(model)}' has no chat template: use a chat model, or "
                "set tokenizer.chat_template (load_tokenizer(..., chat_template=...))"
            )
        loaded_here = isinstance(model, str)
        self.model = load_causal_lm(model, dtype=dtype) if loaded_here else model
        self.device = resolve_device(self.model, device, loaded_here)
        self.max_length = int(max_length)
        self.template_kwargs = dict(template_kwargs or {})
        self._label = model_label(model)
        self._position_ids = accepts_argument(self.model, "position_ids")
        self._logits_to_keep = accepts_argument(self.model, "logits_to_keep")

    # -- rendering -------------------------------------------------------------------------
    def _chat(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
            )
        except Exception as error:  # jinja raises its own types (TemplateError, TypeError, ...)
            raise JudgeError(
                f"the chat template of '{self._label}' cannot render the judge prompt ({error}): pass the "
                "template's arguments in template_kwargs, or a tokenizer whose template takes user and "
                "assistant turns"
            ) from error

    def _render_clean(self, prompt: str, response: str | None) -> str:
        """The full judge input for already-sanitised text (subclasses)."""
        raise NotImplementedError

    def render(self, prompt: str, response: str | None = None) -> str:
        """The exact text the judge model reads for one example (sanitised, then formatted)."""
        clean_response = None if response is None else sanitize_for_judge(response, self.tokenizer)
        return self._render_clean(sanitize_for_judge(prompt, self.tokenizer), clean_response)

    def _encode(self, text: str) -> list[int]:
        # The rendered template already holds BOS and friends as text.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_room(self) -> None:
        """Refuse a max_length that leaves no room for the example next to the judge's own prompt."""
        overhead = len(self._encode(self._render_clean("", "")))
        if overhead + 32 > self.max_length:
            raise JudgeError(
                f"the judge prompt alone is {overhead} tokens but max_length={self.max_length}: raise "
                "max_length (byte-level tokenizers need more) or shorten the rubric"
            )

    def _shorten(self, text: str, keep: int) -> str:
        ids = self._encode(text)
        if len(ids) <= keep:
            return text
        keep = max(keep, 2)
        head = keep // 2
        return self.tokenizer.decode(ids[:head]) + _TRIM_MARK + self.tokenizer.decode(ids[len(ids) - (keep - head) :])

    def _fit(self, prompt: str, response: str | None) -> list[int]:
        """Token ids of the rendered example, cutting the longer text in the middle until it fits."""
        for _ in range(6):
            ids = self._encode(self._render_clean(prompt, response))
            excess = len(ids) - self.max_length
            if excess <= 0:
                return ids
            prompt_len = len(self._encode(prompt))
            response_len = len(self._encode(response)) if response is not None else -1
            if response is not None and response_len >= prompt_len:
                response = self._shorten(response, response_len - excess - _TRIM_SLACK)
            else:
                prompt = self._shorten(prompt, prompt_len - excess - _TRIM_SLACK)
        # Still too long (pathological re-encoding): keep the start and the end of the sequence.
        head = self.max_length // 4
        return ids[:head] + ids[len(ids) - (self.max_length - head) :]

    # -- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def _last_logits(self, sequences: Sequence[list[int]]) -> Tensor:
        """float32 [B, V] logits at the last position of each token sequence."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        padded = pad_batch(sequences, pad, side="left")
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        kwargs: dict[str, Any] = {}
        if self._position_ids:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with eval_mode(self.model):
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            ).logits
        return logits[:, -1].float().cpu()

    def _next_token_after(self, context: str, continuation: str, *, single: bool) -> int | None:
        """Id of the first token of ``continuation`` right after ``context``, if it tokenises apart.

        ``single`` also requires ``continuation`` to be exactly one token.
        """
        context_ids = self._encode(context)
        full = self._encode(context + continuation)
        if full[: len(context_ids)] != context_ids or len(full) <= len(context_ids):
            return None
        if single and len(full) != len(context_ids) + 1:
            return None
        return full[len(context_ids)]


class RubricJudge(CausalLMJudge):
    """An instruction-tuned causal LM rating the example 1-5 on the harm rubric.

    The rubric, the quoted example and the answer format go in one user turn (through the
    model's chat template); the assistant turn is primed with ``"Rating:"`` and the score is
    the expected rating under the next-token probabilities of the digits 1-5, renormalised among
    themselves: r = sum_k k p_k, score = (r - 1) / 4, ``raw`` = r. No sampling.

    Args:
        model: a causal LM, or its name (hub id, folder, GGUF, alias) to load.
        tokenizer: the model's tokenizer (loaded from ``model`` when None).
        rubric: instructions before the example (default :data:`DEFAULT_RUBRIC`); the answer
            format line is always appended after the example.
        batch_size: examples per forward pass.
        max_length: longest judge input in tokens; longer examples are cut in the middle.
        device: where to run; None keeps a given model where it is (a loaded one goes to CUDA
            when available).
        dtype: dtype to load a named model in.
        template_kwargs: extra arguments for ``apply_chat_template``.
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        *,
        rubric: str | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model, tokenizer, batch_size=batch_size, max_length=max_length, device=device, dtype=dtype,
            template_kwargs=template_kwargs,
        )
        self.rubric = DEFAULT_RUBRIC if rubric is None else str(rubric)
        self.primer, self.digit_ids = self._find_digit_tokens()
        self._check_room()

    @property
    def name(self) -> str:
        return f"rubric:{self._label}"

    def _render_clean(self, prompt: str, response: str | None) -> str:
        return self._chat([{"role": "user", "content": rubric_message(self.rubric, prompt, response)}]) + self.primer

    def _find_digit_tokens(self) -> tuple[str, list[int]]:
        """The primer and the ids of the rating tokens 1..5 that follow it.

        Tries "Rating:" followed by " 1".." 5" (tokenizers with space-digit tokens), then
        "Rating: " followed by "1".."5" (tokenizers that split digits off), then no space.
        """
        self.primer = ""
        base = self._render_clean(_PROBE_TEXT, None)
        for primer, form in ((RATING_PRIMER, " {}"), (RATING_PRIMER + " ", "{}"), (RATING_PRIMER, "{}")):
            ids = [self._next_token_after(base + primer, form.format(k), single=True) for k in range(1, 6)]
            if None not in ids and len(set(ids)) == 5:
                return primer, [int(i) for i in ids]
        raise JudgeError(
            f"the tokenizer of '{self._label}' does not encode the ratings 1-5 as single tokens after "
            f"'{RATING_PRIMER}': use a judge model with single-token digits, or HTTPJudge"
        )

    def _score_batch(self, prompts: list[str], responses: list[str] | None) -> tuple[Tensor, list[float]]:
        pairs = zip(prompts, responses if responses is not None else [None] * len(prompts))
        logits = self._last_logits([self._fit(p, r) for p, r in pairs])
        probabilities = logits[:, self.digit_ids].softmax(dim=-1)
        ratings = probabilities @ torch.arange(1, 6, dtype=torch.float32)
        return (ratings - 1.0) / 4.0, ratings.tolist()


class GuardModelJudge(CausalLMJudge):
    """A guard model (Llama Guard 3 style) read as P(unsafe) from its first answer token.

    The conversation (user turn = request, assistant turn = response when given) is formatted
    with the guard's OWN chat template, which wraps it in the guard's policy prompt. The score is
    P(unsafe) = softmax over the logits of the first tokens of ``unsafe_token`` and
    ``safe_token`` at the position after the generation prompt; ``raw`` = P(unsafe).
    ShieldGemma answers "Yes" (violates) / "No": pass ``unsafe_token="Yes", safe_token="No"``
    and its ``guideline`` through ``template_kwargs``.

    Args:
        model, tokenizer, batch_size, max_length, device, dtype, template_kwargs: as in
            :class:`RubricJudge`.
        unsafe_token: the guard's verdict word for unsafe content.
        safe_token: the verdict word for safe content (its first token must differ).
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        *,
        unsafe_token: str = "unsafe",
        safe_token: str = "safe",
        batch_size: int = 8,
        max_length: int = 2048,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model, tokenizer, batch_size=batch_size, max_length=max_length, device=device, dtype=dtype,
            template_kwargs=template_kwargs,
        )
        context = self._render_clean(_PROBE_TEXT, None)
        unsafe_id = self._next_token_after(context, unsafe_token, single=False)
        safe_id = self._next_token_after(context, safe_token, single=False)
        if unsafe_id is None or safe_id is None or unsafe_id == safe_id:
            raise JudgeError(
                f"verdict words unsafe_token={unsafe_token!r} and safe_token={safe_token!r} do not start with "
                f"two different tokens in the tokenizer of '{self._label}': pass the guard's own verdict words"
            )
        self.unsafe_id, self.safe_id = unsafe_id, safe_id
        self._check_room()

    @property
    def name(self) -> str:
        return f"guard:{self._label}"

    def _render_clean(self, prompt: str, response: str | None) -> str:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return self._chat(messages)

    def _score_batch(self, prompts: list[str], responses: list[str] | None) -> tuple[Tensor, list[float]]:
        pairs = zip(prompts, responses if responses is not None else [None] * len(prompts))
        logits = self._last_logits([self._fit(p, r) for p, r in pairs])
        unsafe = logits[:, [self.safe_id, self.unsafe_id]].softmax(dim=-1)[:, 1]
        return unsafe, unsafe.tolist()
