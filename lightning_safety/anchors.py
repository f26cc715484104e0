"""Refusal anchors: the safe reference's own refusals, added to fine-tuning as rows held to it.

Adaptive KL holds the rows an estimator flags. Everything else still moves the model: the rows it
misses, and the task's own training, which alone can make a test-time jailbreak work better (in the
attack zoo, plain SFT on the task rows alone raised the ASR of disguise-framed requests from 29.2%
to 35.4%). A KL on every row (``beta_min > 0``) holds that drift but costs task accuracy, because it
pulls the task's own answers back too.

Anchors hold the drift where safety lives instead: harmful requests the *defender* holds (never the
attack's), plain and in the package's disguise wrappers, answered by the reference itself, and kept
only where that answer is a refusal. Mixed into the training rows, an estimator gives them high risk,
so they train at ``beta_max``: NLL and KL both pull toward the reference's own refusal, and the
task's rows need no KL.

Answer anchors (:func:`answer_anchors`) are the other side: safe prompts that sound alarming (the
package's borderline set), answered by the reference, kept only where it answers. They hold the
model to answering them, so that fine-tuning does not teach it to over-refuse.

Example::

    anchors = refusal_anchors(reference, tokenizer, load_demo_prompts("harmful"), count=8)
    rows = task_rows + anchors   # 8 plain + 8 wrapped refusals
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_safety.data.records import row_id
from lightning_safety.errors import DataError

__all__ = ["answer_anchors", "refusal_anchors"]


def refusal_anchors(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    count: int = 8,
    wrapped: bool = True,
    generation: Any = None,
    detector: Any = None,
) -> list[dict[str, Any]]:
    """The reference's refusals to ``count`` of ``prompts``, and to ``count`` wrapped copies of them.

    Requests are tried in order (the wrapped copies in the order of :func:`add_wrapped_copies`), in
    batches, until ``count`` of each kind got a refusal; a request the model answers is skipped, so
    no anchor ever teaches compliance.

    Args:
        model: the safe reference (a Hugging Face causal LM), the one fine-tuning is held to.
        tokenizer: its tokenizer, with a chat template.
        prompts: harmful requests the defender holds, e.g. ``load_demo_prompts("harmful")``; keep
            them apart from any evaluation set.
        count: refusals of each kind (plain, wrapped) to return.
        wrapped: also anchor wrapped copies (the package's disguise wrappers,
            :func:`~lightning_safety.demo_data.add_wrapped_copies`); False: plain requests only.
        generation: decoding settings (:class:`~lightning_safety.evaluation.generation.GenerationSettings`);
            default greedy, 48 new tokens.
        detector: what counts as a refusal (``is_refusal(text) -> bool``); default the GCG keyword
            list matched in the first 40 characters only, so an answer that merely mentions the law
            is not taken for one.

    Returns:
        ``count`` (or ``2 * count`` with ``wrapped``) rows ``{"id", "prompt", "response", "anchor": "refusal"}``,
        the plain ones first.

    Raises:
        DataError: ``count < 1``, no prompts, or the model refused fewer than ``count`` of a kind
            (pass more prompts or a lower count, and check that ``model`` is the safe reference).
    """
    # Imported here: generation imports torch and transformers, which the package's CLI help avoids.
    from lightning_safety.demo_data import add_wrapped_copies

    plain, generation, detector = _checked(prompts, count, generation, detector)
    kinds = [("plain", plain)] + ([("wrapped", add_wrapped_copies(plain)[len(plain):])] if wrapped else [])
    rows: list[dict[str, Any]] = []
    for kind, candidates in kinds:
        rows.extend(_collect(model, tokenizer, candidates, count, lambda text: detector.is_refusal(text), generation,
                             "refusal", f"the model refused only {{kept}} of {len(candidates)} {kind} requests, "
                             f"fewer than count={count}: pass more prompts or a lower count, and check that it is "
                             "the safe reference"))
    return rows


def answer_anchors(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    count: int = 16,
    generation: Any = None,
    detector: Any = None,
) -> list[dict[str, Any]]:
    """The reference's answers to ``count`` of ``prompts``: safe requests it answers rather than refuses.

    Requests are tried in order, in batches, until ``count`` got an answer that does not start as a
    refusal; a request the model refuses is skipped, so no answer anchor teaches a refusal.

    Args:
        model: the safe reference (a Hugging Face causal LM).
        tokenizer: its tokenizer, with a chat template.
        prompts: safe requests that sound alarming, e.g. ``load_demo_prompts("borderline")``; keep them
            apart from any over-refusal evaluation set (XSTest).
        count: answers to return.
        generation: decoding settings (default greedy, 48 new tokens).
        detector: what counts as a refusal (default as in :func:`refusal_anchors`).

    Returns:
        ``count`` rows ``{"id", "prompt", "response", "anchor": "answer"}``.

    Raises:
        DataError: ``count < 1``, no prompts, or the model answered fewer than ``count``.
    """
    plain, generation, detector = _checked(prompts, count, generation, detector)
    return _collect(model, tokenizer, plain, count, lambda text: not detector.is_refusal(text), generation, "answer",
                    f"the model answered only {{kept}} of {len(plain)} requests, fewer than count={count}: pass "
                    "more prompts or a lower count")


def _checked(prompts: Sequence[str], count: int, generation: Any, detector: Any) -> tuple[list[str], Any, Any]:
    """The distinct non-empty prompts and the default decoding and detector, after checking ``count``."""
    from lightning_safety.evaluation.generation import GenerationSettings
    from lightning_safety.evaluation.refusal import KeywordRefusal

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DataError(f"count={count!r} is invalid: give the number of anchors of each kind, >= 1")
    plain = list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))
    if not plain:
        raise DataError("got no prompts: pass the requests the defender holds, e.g. load_demo_prompts('harmful') for "
                        "refusal anchors or load_demo_prompts('borderline') for answer anchors")
    return plain, generation or GenerationSettings(max_new_tokens=48), \
        detector or KeywordRefusal(match="start", start_chars=40)


def _collect(model: Any, tokenizer: Any, candidates: list[str], count: int, keep: Callable[[str], bool],
             generation: Any, kind: str, too_few: str) -> list[dict[str, Any]]:
    """The first ``count`` candidates whose greedy response ``keep`` accepts, as anchor rows of ``kind``;
    else DataError(``too_few`` with ``{kept}`` filled in)."""
    from lightning_safety.evaluation.generation import generate_responses

    kept: list[dict[str, Any]] = []
    for start in range(0, len(candidates), 2 * count):
        batch = candidates[start:start + 2 * count]
        for prompt, response in zip(batch, generate_responses(model, tokenizer, batch, generation)):
            if len(kept) < count and response.strip() and keep(response):
                kept.append({"id": row_id("anchor", prompt), "prompt": prompt, "response": response, "anchor": kind})
        if len(kept) == count:
            return kept
    raise DataError(too_few.format(kept=len(kept)))
