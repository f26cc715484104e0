"""Risk of a list of prompts with any estimator: a judge, a probe, or a combination of them.

Estimators other than judges read training batches (:class:`~lightning_safety.risk.RiskEstimator`);
:func:`score_prompts` builds those batches from the prompts, as :class:`~lightning_safety.data.ChatCollator`
would from prompt-only rows, sets the estimators up on the given model and tears them down after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.data.formatting import IGNORE_INDEX, render_ids, require_chat_template, resolve_pad_token_id
from lightning_safety.data.padding import pad_batch
from lightning_safety.data.records import content_id
from lightning_safety.errors import DataError, RiskError
from lightning_safety.risk.base import ConstantRisk, RiskEstimator, check_risk
from lightning_safety.risk.estimators import JudgeRisk, ProbeRisk
from lightning_safety.risk.judges.base import Judge
from lightning_safety.risk.probe import ActivationProbe

Estimator = RiskEstimator | Judge | ActivationProbe


class _ScoredModel(nn.Module):
    """What estimators' ``setup`` expects of a LightningModule: the model, as policy and as frozen reference."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reference = model


def score_prompts(
    estimator: Estimator,
    prompts: Sequence[str],
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    responses: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Tensor:
    """Risk in [0, 1] of each prompt (a user request) with any estimator.

    Args:
        estimator: a :class:`~lightning_safety.risk.judges.Judge`, an
            :class:`~lightning_safety.risk.probe.ActivationProbe` (read as ``ProbeRisk(probe)``), or any
            :class:`~lightning_safety.risk.RiskEstimator`: ``JudgeRisk``, ``ProbeRisk``, ``RefusalRisk``, ``MaxRisk`` /
            ``MeanRisk`` of them, ``ConstantRisk``, your own.
        prompts: the requests, each scored as one user turn.
        model: the model a probe reads (the one it was trained on; a PEFT model is read with its
            adapter off, as the frozen reference is in training). Estimators are set up on it for this
            call and torn down after; a ``ProbeRisk`` that a callback has set up already is used as it is.
        tokenizer: the model's tokenizer; needed by every estimator that reads tokens (all but judges
            and ``ConstantRisk``). Prompts are rendered with its chat template and the generation header,
            as a training row without a system message (the template's default system prompt, if any).
        responses: answers to show judges that read them (a bare judge, ``JudgeRisk(include_response=True)``);
            they reach the estimators as the conversations' assistant turns (``batch["messages"]``),
            the tokens stay the prompt's. None: every request is judged alone.
        batch_size: prompts per estimator call (one model forward for a probe), sorted by length; a judge
            alone gets at least its own ``batch_size`` rows per call.
        progress: show a progress bar.

    Returns:
        float32 [N] on the CPU, in the order of ``prompts``; a row a judge failed to score is 1 (fail-closed,
        counted in the estimator's ``failures``).
    """
    prompts = _texts(prompts, "prompts")
    if responses is not None:
        responses = _texts(responses, "responses")
        if len(responses) != len(prompts):
            raise DataError(f"{len(responses)} responses for {len(prompts)} prompts: give one response per prompt")
    if int(batch_size) < 1:
        raise DataError(f"batch_size={batch_size} is invalid: use a positive number of prompts per call")
    if isinstance(estimator, ActivationProbe):
        estimator = ProbeRisk(estimator)
    if isinstance(estimator, JudgeRisk):
        estimator, responses = estimator.judge, responses if estimator.include_response else None
    if isinstance(estimator, Judge):
        return _judge_scores(estimator, prompts, responses, max(int(batch_size), estimator.batch_size), progress)
    if not isinstance(estimator, RiskEstimator):
        raise RiskError(
            f"cannot score prompts with a {type(estimator).__name__}: pass a Judge, an ActivationProbe or a RiskEstimator"
        )
    return _estimator_scores(estimator, prompts, responses, model, tokenizer, int(batch_size), progress)


def _texts(values: Sequence[str], what: str) -> list[str]:
    if isinstance(values, str):
        raise DataError(f"{what} is one string: pass a list of strings")
    values = list(values)
    bad = next((i for i, value in enumerate(values) if not isinstance(value, str)), None)
    if bad is not None:
        raise DataError(f"{what}[{bad}] is a {type(values[bad]).__name__}, not a string: pass a list of strings")
    return values


def _judge_scores(judge: Judge, prompts: list[str], responses: list[str] | None, chunk: int, progress: bool) -> Tensor:
    scores = torch.empty(len(prompts))
    for start in _steps(len(prompts), chunk, progress, "judge"):
        part = slice(start, start + chunk)
        scores[part] = judge.score(prompts[part], None if responses is None else responses[part]).score.float().cpu()
    return scores


def leaves(estimator: RiskEstimator) -> list[RiskEstimator]:
    """The estimators inside a combination (``MaxRisk``, ``MeanRisk``, nested), or the estimator itself."""
    inner = getattr(estimator, "estimators", None)
    if not isinstance(inner, (list, tuple)):
        return [estimator]
    return [leaf for part in inner for leaf in leaves(part)]


def _estimator_scores(
    estimator: RiskEstimator,
    prompts: list[str],
    responses: list[str] | None,
    model: nn.Module | None,
    tokenizer: Any,
    batch_size: int,
    progress: bool,
) -> Tensor:
    parts = leaves(estimator)
    readers = [leaf for leaf in parts if not isinstance(leaf, (JudgeRisk, ConstantRisk))]
    if readers and tokenizer is None:
        raise RiskError(
            f"{type(readers[0]).__name__} reads the prompts' tokens: pass tokenizer= (the tokenizer of the model it reads)"
        )
    ready = {id(leaf) for leaf in parts if leaf.is_set_up}  # set up by a callback already: used as it is
    unready = [leaf for leaf in parts if leaf.reads_model and id(leaf) not in ready]
    if model is None and unready:
        raise RiskError(f"{type(unready[0]).__name__} reads {unready[0].reads_model}")
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    if responses is not None:
        for messages, response in zip(conversations, responses):
            messages.append({"role": "assistant", "content": response})
    encoded = _render(conversations, tokenizer)
    set_up: list[RiskEstimator] = []
    scores = torch.empty(len(prompts))
    try:
        if model is not None:
            holder = _ScoredModel(model)
            for leaf in parts:
                if id(leaf) not in ready:
                    set_up.append(leaf)
                    leaf.setup(holder)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        pad = resolve_pad_token_id(tokenizer) if tokenizer is not None else 0
        name = type(estimator).__name__
        for start in _steps(len(prompts), batch_size, progress, name):
            rows = order[start : start + batch_size]
            batch = _batch(rows, encoded, conversations, pad)
            scores[torch.tensor(rows)] = check_risk(estimator(batch, model), len(rows), name).cpu()
    finally:
        for leaf in set_up:
            leaf.teardown()
    return scores


def _render(conversations: list[list[dict[str, str]]], tokenizer: Any) -> list[list[int]]:
    """Each prompt's tokens (user turn + generation header); one placeholder token each without a tokenizer
    (judges and constants read no tokens, only the batch's size)."""
    if tokenizer is None:
        return [[0] for _ in conversations]
    require_chat_template(tokenizer)
    return [render_ids(messages[:1], tokenizer, add_generation_prompt=True) for messages in conversations]


def _batch(rows: list[int], encoded: list[list[int]], conversations: list[list[dict[str, str]]], pad: int) -> dict[str, Any]:
    """The training batch of ``rows`` (right-padded, as ChatCollator makes it): the whole sequence is prompt."""
    padded = pad_batch([encoded[i] for i in rows], pad)
    return {
        **padded,
        "labels": torch.full_like(padded["input_ids"], IGNORE_INDEX),
        "prompt_length": padded["attention_mask"].sum(dim=1),
        "index": torch.tensor(rows, dtype=torch.long),
        "id": [content_id(conversations[i]) for i in rows],
        "messages": [conversations[i] for i in rows],
    }


def _steps(total: int, chunk: int, progress: bool, desc: str) -> Iterator[int]:
    """Start of each chunk of ``total`` rows, with a progress bar (rows) when asked."""
    starts = range(0, total, chunk)
    if not progress:
        yield from starts
        return
    from tqdm.auto import tqdm  # only with a progress bar

    with tqdm(total=total, desc=desc, unit="prompt") as bar:
        for start in starts:
            yield start
            bar.update(min(chunk, total - start))
