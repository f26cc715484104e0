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

from lightning_safety.data.padding import pad_batch
from lightning_safety.distributed import is_sharded
from lightning_safety.errors import RiskError
from lightning_safety.models import eval_mode, is_peft_model, load_tokenizer
from lightning_safety.reference import REFERENCE_ADAPTER
from lightning_safety.risk.base import RiskEstimator, _settings_digest
from lightning_safety.risk.estimators import reference_reader
from lightning_safety.risk.judges.causal import accepts_argument
from lightning_safety.risk.probe.artifact import adapter_fingerprint, model_fingerprint

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
    compute alone.
    """
    if not prompts:
        return torch.zeros(0)
    if any(len(p) == 0 for p in prompts):
        raise RiskError("a prompt has no tokens: every row needs its request before the answer")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    keep = accepts_argument(model, "logits_to_keep")
    per_chunk = max(1, rows_per_forward // len(openers))
    log_probs = []
    with eval_mode(model):
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start : start + per_chunk]
            scored = _with_prompt_cache(model, chunk, openers, pad_id, device, keep) if reuse_prompt else None
            if scored is None:
                scored = _one_sequence_per_opener(model, chunk, openers, pad_id, device, keep)
            log_probs.append(scored)
    return torch.cat(log_probs).exp().sum(dim=1).clamp(0.0, 1.0)


def _gather(log_probs: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Sum over t < lengths of log_probs[n, t, tokens[n, t]]: [N, L, V], [N, L], [N] -> [N]."""
    picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths.unsqueeze(1)
    return (picked * valid).sum(dim=1)


def _opener_table(openers: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Openers right-padded into [K, L] token ids (0 on padding) and their lengths [K]."""
    longest = max(len(o) for o in openers)
    table = torch.zeros(len(openers), longest, dtype=torch.long, device=device)
    for k, opener in enumerate(openers):
        table[k, : len(opener)] = torch.tensor(list(opener), device=device)
    return table, torch.tensor([len(o) for o in openers], device=device)


def _with_prompt_cache(model: nn.Module, prompts: Sequence[Sequence[int]], openers: Sequence[Sequence[int]],
                       pad_id: int, device: torch.device, keep: bool) -> Tensor | None:
    """log P(opener k | prompt b) [B, K]: one prompt forward, then every opener from the prompt's KV cache."""
    batch, count = len(prompts), len(openers)
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
    first = out.logits[:, -1].float().log_softmax(-1)  # [B, V]: the answer's first token
    table, lengths = _opener_table(openers, device)  # [K, L], [K]
    total = first[:, table[:, 0]]  # [B, K]
    if table.shape[1] == 1:
        return total.cpu()
    cache.batch_repeat_interleave(count)  # row b*K + k continues prompt b with opener k
    inputs = table[:, :-1].repeat(batch, 1)  # [B*K, L-1]: the opener's tokens but its last
    steps = inputs.shape[1]
    full_mask = torch.cat([mask.repeat_interleave(count, dim=0), torch.ones_like(inputs)], dim=1)
    positions = mask.sum(-1).repeat_interleave(count).unsqueeze(1) + torch.arange(steps, device=device)
    logits = model(input_ids=inputs, attention_mask=full_mask, position_ids=positions, use_cache=False,
                   **{cache_argument: cache}).logits  # [B*K, L-1, V]: predicts the opener's tokens 1..L-1
    rest = _gather(logits.float().log_softmax(-1), table[:, 1:].repeat(batch, 1), (lengths - 1).repeat(batch))
    return (total + rest.view(batch, count)).cpu()


def _one_sequence_per_opener(model: nn.Module, prompts: Sequence[Sequence[int]], openers: Sequence[Sequence[int]],
                             pad_id: int, device: torch.device, keep: bool) -> Tensor:
    """log P(opener k | prompt b) [B, K] from one left-padded forward of every (prompt + opener) sequence."""
    table, lengths = _opener_table(openers, device)
    longest = table.shape[1]
    # Left padding puts every opener in the last columns: the last `longest` + 1 positions hold what is read.
    sequences = [list(p) + list(o) for p in prompts for o in openers]
    padded = pad_batch(sequences, pad_id, side="left", device=device)
    mask = padded["attention_mask"]
    kwargs: dict[str, Any] = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if keep:
        kwargs["logits_to_keep"] = longest + 1
    logits = model(input_ids=padded["input_ids"], attention_mask=mask, **kwargs).logits[:, -(longest + 1):]
    log_probs = logits.float().log_softmax(-1)  # column j predicts the token in column T - longest + j
    count = len(openers)
    out = torch.empty(len(prompts), count)
    for n in range(len(sequences)):
        length = int(lengths[n % count])
        positions = torch.arange(longest - length, longest, device=device)
        out[n // count, n % count] = log_probs[n, positions, table[n % count, :length]].sum().cpu()
    return out


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
        target, view, use_adapter = reference_reader(pl_module, self.model_attr, "reference", what="refusal risk")
        if not use_adapter and is_peft_model(target):
            view = target.disable_adapter  # the PEFT base is the reference
        self._target, self._view = target, view
        self._reference_id = model_fingerprint(target)[:12]
        if use_adapter and is_peft_model(target):  # adapter_copy: the reference is the base + its own adapter
            self._reference_id += ":" + adapter_fingerprint(target, REFERENCE_ADAPTER)[:12]

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
