"""Risk from the safe reference itself: how likely it is to begin its answer with a refusal.

The frozen reference is the model whose safety the fine-tune must keep; what it refuses is, by
definition, what it was aligned to refuse. :class:`RefusalRisk` asks it directly, with no trained
head and no data of its own: for each training request it computes the probability that the
reference's answer starts with one of a few refusal openers ("I'm sorry", "I cannot", ...):

    risk(x) = sum_o  P_ref(o | x) = sum_o  prod_t  p_ref(o_t | x, o_<t)

over a prefix-free set of opener token sequences (no opener is the start of another, so the sum
is the probability of a union of disjoint events and stays in [0, 1]). It is a lower bound of the
reference's refusal probability: a refusal that starts with other words, or the same words
tokenised otherwise, is not counted. Unlike a probe or a judge it does not need to have seen the
attack's topic or wording: a disguised request the reference would still refuse is risky whatever
frame it comes in; one the reference would answer is not (its ASR under that frame is the
aligned model's own). It reads the request alone (the response is the attacker's), so it is
cached per example like any estimator on a frozen model.

Cost: one prompt forward per batch (the output layer at its last position only), then the K
openers (L tokens at most) continued from the prompt's KV cache: about one probe forward; with
the per-example cache, once per example per run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.continuation import continuation_log_probs
from lightning_safety.distributed import is_sharded
from lightning_safety.errors import RiskError
from lightning_safety.models import load_tokenizer
from lightning_safety.risk.base import RiskEstimator, _settings_digest
from lightning_safety.risk.estimators import reference_reader
from lightning_safety.risk.probe.artifact import model_fingerprint

__all__ = ["DEFAULT_REFUSAL_OPENERS", "RefusalRisk", "opener_sequences", "refusal_probability"]

DEFAULT_REFUSAL_OPENERS: tuple[str, ...] = (
    "I'm sorry",
    "I am sorry",
    "Sorry",
    "I apologize",
    "I cannot",
    "I can't",
    "I can not",
    "I won't",
    "I will not",
    "I'm unable",
    "I am unable",
    "I'm not able",
    "I must decline",
    "As an AI",
)
"""How chat models commonly begin a refusal (the first words of the GCG refusal strings and their
common variants). Give your reference's own openers where they differ."""


def opener_sequences(tokenizer: Any, openers: Sequence[str]) -> list[list[int]]:
    """Token ids of each opener as the first words of an answer, duplicates dropped and made prefix-free.

    An opener whose tokens begin with another opener's tokens is dropped: the shorter one's
    probability already contains it, and counting both would count those answers twice.
    """
    if isinstance(openers, str) or not openers:
        raise RiskError("refusal openers must be a non-empty list of strings, e.g. [\"I'm sorry\", \"I cannot\"]")
    encoded: list[tuple[int, ...]] = []
    for opener in openers:
        ids = tuple(tokenizer(str(opener), add_special_tokens=False)["input_ids"])
        if not str(opener).strip() or not ids:
            raise RiskError(f"refusal opener {opener!r} has no tokens: give the words a refusal starts with")
        encoded.append(ids)
    unique = sorted(set(encoded), key=lambda ids: (len(ids), ids))
    kept: list[tuple[int, ...]] = []
    for ids in unique:
        if not any(ids[: len(shorter)] == shorter for shorter in kept):
            kept.append(ids)
    return [list(ids) for ids in kept]


@torch.no_grad()
def refusal_probability(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    openers: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    rows_per_forward: int = 64,
    reuse_prompt: bool = True,
) -> Tensor:
    """P(the answer starts with one of ``openers`` | prompt) under ``model``: float32 [B] in [0, 1].

    Args:
        model: a causal LM (called as it is: switch adapters off around the call if needed).
        prompts: B token-id sequences, each the rendered request up to and including the
            assistant's header (where the answer's first token goes).
        openers: K prefix-free token-id sequences (:func:`opener_sequences`).
        pad_id: the id written into padding (masked out).
        rows_per_forward: (prompt, opener) pairs per forward.
        reuse_prompt: run each prompt once and continue it with every opener from its KV cache
            (K times fewer prompt tokens); False, or a model without a KV cache: one forward of
            ``[B x K, T + L]``. Both give the same numbers.

    Prompts are left-padded with explicit position ids, so each row computes what it would
    compute alone. An empty prompt is refused (``DataError``, by
    :func:`~lightning_safety.continuation.continuation_log_probs`).
    """
    if not prompts:
        return torch.zeros(0)
    log_probs = continuation_log_probs(model, prompts, openers, pad_id=pad_id,
                                       prompts_per_forward=max(1, rows_per_forward // len(openers)),
                                       reuse_prompt=reuse_prompt)
    return log_probs.exp().sum(dim=1).clamp(0.0, 1.0)


class RefusalRisk(RiskEstimator):
    """Risk = the probability that the frozen reference begins its answer to the request with a refusal.

    No training, no data: the reference's own safety behaviour is the estimator (see the module
    docstring for the formula and what it cannot see). Combine it with a probe or judge through
    :class:`~lightning_safety.risk.MaxRisk` for defence in depth: the probe catches harmful rows
    the reference has never been asked about in that form, this catches whatever the reference
    would refuse, in any wording.

    Args:
        tokenizer: the reference's tokenizer (object, or a name/folder for
            :func:`~lightning_safety.models.load_tokenizer`): it tokenises the openers.
        openers: the words a refusal of this reference starts with (:data:`DEFAULT_REFUSAL_OPENERS`).
        model_attr: attribute of the LightningModule holding the causal LM (default ``policy`` or ``model``).
        rows_per_forward: (request, opener) sequences per forward (memory: [rows, T, hidden] activations).

    The reference is found as :class:`~lightning_safety.risk.ProbeRisk` finds it: the module's
    ``reference`` when it has one, else the PEFT base with the adapter switched off (or the frozen
    reference adapter under ``adapter_copy``).
    """

    cacheable = True
    reads_model = "the reference's next-token probabilities: pass model= (the safe reference)"

    def __init__(
        self,
        tokenizer: Any,
        openers: Sequence[str] = DEFAULT_REFUSAL_OPENERS,
        model_attr: str | None = None,
        rows_per_forward: int = 64,
    ) -> None:
        if isinstance(rows_per_forward, bool) or not isinstance(rows_per_forward, int) or rows_per_forward < 1:
            raise RiskError(f"rows_per_forward={rows_per_forward!r} is invalid: use a positive integer")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.openers = tuple(str(o) for o in ([openers] if isinstance(openers, str) else openers))
        self.opener_ids = opener_sequences(self.tokenizer, self.openers)
        self.model_attr = model_attr
        self.rows_per_forward = rows_per_forward
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self._target: nn.Module | None = None
        self._view: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._reference_id = ""

    @property
    def namespace(self) -> str:
        # The scores depend on the reference's weights: its fingerprint joins the settings once set up.
        return f"{self.checkpoint_namespace}:{self._reference_id}"

    @property
    def checkpoint_namespace(self) -> str:
        return f"refusal:{_settings_digest(self)}"

    def setup(self, pl_module: nn.Module) -> None:
        if self._target is not None:
            return
        self._target, self._view, adapter_id = reference_reader(pl_module, self.model_attr, "reference", what="refusal risk")
        self._reference_id = model_fingerprint(self._target)[:12] + adapter_id

    def teardown(self) -> None:
        self._target, self._view = None, contextlib.nullcontext

    @property
    def is_set_up(self) -> bool:  # type: ignore[override]
        return self._target is not None

    @property
    def collective(self) -> bool:  # type: ignore[override]
        return self._target is not None and is_sharded(self._target)

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        if self._target is None:
            raise RiskError("RefusalRisk was called before setup(): attach it through a RiskCallback or score_prompts")
        input_ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["prompt_length"]
        prompts = []
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row][mask[row].bool()]  # right- or left-padded alike
            prompts.append(tokens[: int(lengths[row])].tolist())
        with self._view():
            risk = refusal_probability(self._target, prompts, self.opener_ids, pad_id=self.pad_id,
                                       rows_per_forward=self.rows_per_forward)
        return risk.to(input_ids.device)
