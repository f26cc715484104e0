"""Utility tasks: does the fine-tuned model still do useful work?

Two kinds:

* ``classification`` (SST-2 preset): each prompt has one of a few label words. Scored by default
  from the model's log-likelihood of each label word as the start of its answer (``scoring="logits"``:
  one forward per prompt, the label words read from its KV cache, no parsing of free text, stable
  for small models), or from a
  short generation whose first label word is the prediction (``scoring="generation"``; no label word
  = wrong). Small models often prefer one label whatever the input (SmolLM2-135M-Instruct answers
  "positive" to every SST-2 sentence: accuracy = the share of positive labels, which says nothing).
  ``calibration="content_free"`` (the default for logits) removes that prior as in Zhao et al.
  2021, "Calibrate Before Use": the label log-probabilities the model gives the template filled with
  content-free inputs ("N/A", "", "[MASK]") are averaged and subtracted before the argmax.
* ``exact_match`` (GSM8K preset): the final number of a generated answer against the reference's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_safety.continuation import continuation_log_probs
from lightning_safety.data.formatting import render_ids, resolve_pad_token_id
from lightning_safety.data.sources import load_records
from lightning_safety.errors import DataError
from lightning_safety.evaluation.generation import GenerationSettings, prompt_messages

SST2_TEMPLATE = (
    "Is the sentiment of this movie review positive or negative?\n\nReview: {text}\n\n"
    "Answer with one word: positive or negative."
)
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
GSM8K_TEMPLATE = "{text}\n\nSolve the problem step by step and end with 'The answer is N.'"

_PRESETS: dict[str, dict[str, Any]] = {
    "sst2": {
        "kind": "classification",
        "prompt_field": "sentence",
        "target_field": "label",
        "labels": ["negative", "positive"],
        "template": SST2_TEMPLATE,
    },
    "gsm8k": {
        "kind": "exact_match",
        "prompt_field": "question",
        "target_field": "answer",
        "template": GSM8K_TEMPLATE,
        "max_new_tokens": 256,
    },
}


@dataclass(frozen=True)
class UtilityTask:
    """A utility benchmark read from a file or ``datasets`` name.

    Args:
        path: the data (e.g. SST-2's ``dev.tsv``, GSM8K's ``test.jsonl``).
        task: ``sst2`` or ``gsm8k`` (presets for fields, labels and prompt), or ``classification`` /
            ``exact_match`` with the fields below.
        name: the metric name (``utility/<name>``); default: the task.
        limit: first ``limit`` rows (None: all).
        prompt_field: the input column.
        target_field: the answer column (classification: a label index or a label word).
        labels: classification label words, in label-index order.
        template: the user prompt, with ``{text}`` where the input goes.
        scoring: classification from label ``logits`` or from ``generation``.
        calibration: with logits, ``content_free`` removes the model's label prior (see above);
            ``none`` takes the raw argmax.
        max_new_tokens: generation length for this task (default: the evaluation's).
        split: split of a hub dataset.
    """

    path: str
    task: Literal["sst2", "gsm8k", "classification", "exact_match"] = "classification"
    name: str | None = None
    limit: int | None = 200
    prompt_field: str | None = None
    target_field: str | None = None
    labels: list[str] | None = None
    template: str | None = None
    scoring: Literal["logits", "generation"] = "logits"
    calibration: Literal["content_free", "none"] = "content_free"
    max_new_tokens: int | None = None
    split: str = "validation"


@dataclass
class LoadedUtilityTask:
    """A utility task's prompts and targets, ready to score."""

    name: str
    kind: Literal["classification", "exact_match"]
    prompts: list[str]
    targets: list[Any]  # classification: label indices; exact_match: reference answers
    labels: list[str] = field(default_factory=list)
    scoring: str = "logits"
    max_new_tokens: int | None = None
    calibration: str = "content_free"
    template: str = "{text}"

    def content_free_prompts(self) -> list[str]:
        """The template filled with inputs that carry no content (for label-prior calibration)."""
        return [self.template.replace("{text}", text) for text in CONTENT_FREE_INPUTS]


def load_utility_task(task: UtilityTask) -> LoadedUtilityTask:
    """Read a task's rows and turn them into prompts and targets (label indices or answers)."""
    preset = _PRESETS.get(task.task, {})
    kind = preset.get("kind", task.task)
    if kind not in ("classification", "exact_match"):
        raise DataError(f"utility task={task.task!r} is invalid: use sst2, gsm8k, classification or exact_match")
    prompt_field = task.prompt_field or preset.get("prompt_field")
    target_field = task.target_field or preset.get("target_field")
    labels = list(task.labels or preset.get("labels") or [])
    template = task.template or preset.get("template") or "{text}"
    if "{text}" not in template:
        raise DataError(f"utility template {template!r} has no {{text}} placeholder: add one where the input goes")
    if not prompt_field or not target_field:
        raise DataError(f"utility task {task.path}: set prompt_field and target_field (or use task=sst2/gsm8k)")
    if kind == "classification" and len(labels) < 2:
        raise DataError(f"classification task {task.path} needs at least two label words in labels")
    if task.calibration not in ("content_free", "none"):
        raise DataError(f"utility calibration={task.calibration!r} is invalid: use 'content_free' or 'none'")
    if task.limit is not None and int(task.limit) < 1:
        raise DataError(f"utility limit={task.limit} is invalid: use a positive integer or None")
    rows = load_records(task.path, split=task.split)
    if not rows:
        raise DataError(f"utility task {task.path} has no rows")
    for column in (prompt_field, target_field):
        if column not in rows[0]:
            raise DataError(f"{task.path} has no column '{column}': use one of {sorted(rows[0])}")
    rows = rows[: task.limit] if task.limit is not None else rows
    prompts = [template.replace("{text}", str(row[prompt_field]).strip()) for row in rows]
    if kind == "classification":
        targets: list[Any] = [_label_index(row[target_field], labels, task.path) for row in rows]
    else:
        targets = [str(row[target_field]) for row in rows]
    return LoadedUtilityTask(
        name=task.name or task.task,
        kind=kind,
        prompts=prompts,
        targets=targets,
        labels=labels,
        scoring=task.scoring,
        max_new_tokens=task.max_new_tokens or preset.get("max_new_tokens"),
        calibration=task.calibration,
        template=template,
    )


def _label_index(value: Any, labels: list[str], path: str) -> int:
    text = str(value).strip()
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(labels):
        return int(text)
    lowered = [label.lower() for label in labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise DataError(f"{path}: target {value!r} is neither a label index nor one of the labels {labels}")


def parse_label(response: str, labels: Sequence[str]) -> int:
    """Index of the label word that occurs first in ``response`` (whole words, any case); -1 if none."""
    best, position = -1, None
    for index, label in enumerate(labels):
        match = re.search(rf"\b{re.escape(label.lower())}\b", response.lower())
        if match and (position is None or match.start() < position):
            best, position = index, match.start()
    return best


def _label_variants(label: str) -> list[str]:
    return list(dict.fromkeys([label, label.capitalize(), label.lower()]))


@torch.no_grad()
def label_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    settings: GenerationSettings | None = None,
) -> Tensor:
    """float32 [N, C]: log P(label_c starts the answer | prompt_n) under the chat template.

    A label's score is the log-sum-exp over its spellings (``positive``, ``Positive``), so the
    prediction does not hinge on capitalisation. Each prompt runs once and every spelling is read
    from its KV cache (:func:`~lightning_safety.continuation.continuation_log_probs`),
    ``settings.batch_size`` prompts at a time.
    """
    settings = settings or GenerationSettings()
    spellings: list[list[int]] = []  # every spelling of every label, as token ids
    owner: list[int] = []  # the label each spelling belongs to
    for c, label in enumerate(labels):
        for variant in _label_variants(label):
            spellings.append(list(tokenizer(variant, add_special_tokens=False)["input_ids"]))
            owner.append(c)
    prefixes = [
        render_ids(prompt_messages(prompt, settings.system_prompt), tokenizer, add_generation_prompt=True,
                   chat_template=settings.chat_template)
        for prompt in prompts
    ]
    per_spelling = continuation_log_probs(model, prefixes, spellings, pad_id=resolve_pad_token_id(tokenizer),
                                          prompts_per_forward=settings.batch_size)  # [N, S]
    scores = torch.full((len(prompts), len(labels)), float("-inf"))
    for s, c in enumerate(owner):
        scores[:, c] = torch.logaddexp(scores[:, c], per_spelling[:, s])
    return scores


def calibrated_label_scores(
    model: nn.Module,
    tokenizer: Any,
    task: LoadedUtilityTask,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
) -> Tensor:
    """float32 [N, C] label scores of ``prompts``, with the label prior removed if the task asks for it."""
    scores = torch.log_softmax(label_log_likelihoods(model, tokenizer, prompts, task.labels, settings), dim=1)
    if task.calibration == "content_free":
        prior = label_log_likelihoods(model, tokenizer, task.content_free_prompts(), task.labels, settings)
        scores = scores - torch.log_softmax(prior, dim=1).mean(dim=0)
    return scores
