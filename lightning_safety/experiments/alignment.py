"""A quick refusal SFT that stands in for a vendor's safety training.

The library's premise is a model that *is* safety aligned and must stay so while it is fine-tuned.
Small open chat models such as SmolLM2-135M-Instruct are instruction tuned but barely safety
tuned: they comply with most AdvBench requests. To test the library on such a model we first
give it a little alignment of our own. This module is that stand-in for the vendor's safety
training (RLHF, constitutional training, ...): a short LoRA SFT on

* harmful requests -> a refusal, varied among a few refusal sentences written here (each holds
  standard refusal phrases such as "I'm sorry" / "I cannot", the phrases the GCG keyword rule of
  :mod:`lightning_safety.evaluation.refusal` looks for);
* benign requests -> the model's *own* greedy answer, generated before training, so that the
  step teaches "refuse these" without teaching new answers to anything else (self-distillation
  keeps utility).

The LoRA is then merged into the weights and a plain Hugging Face model comes back. It is a
deliberately small, cheap alignment: it makes the model refuse requests that resemble the
training ones, it is not a robust safety training and should not be presented as one.

:func:`build_aligned_reference` runs it for a model name and caches the result as a model folder
under ``cache_root()/aligned/<hash>``: the hash covers the model, the prompts, the refusal texts
and every setting, so the same inputs reuse the folder and different ones build another.

Example::

    folder = build_aligned_reference("smollm2-135m-instruct", advbench_train, alpaca_train)
    module = SafeFineTuning(str(folder), lora=LoraSettings(r=16))   # the aligned model as the policy
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from lightning_safety.data.formatting import render_ids
from lightning_safety.errors import LightningSafetyError
from lightning_safety.evaluation.generation import GenerationSettings, generate_responses, prompt_messages
from lightning_safety.experiments.recipe import fine_tune
from lightning_safety.models import LoraSettings, load_causal_lm, load_tokenizer, resolve_model_source
from lightning_safety.paths import atomic_directory, cache_root, save_pretrained_here
from lightning_safety.schedules import ConstantBeta

__all__ = [
    "ALIGNMENT_VERSION",
    "AlignmentSettings",
    "DEFAULT_REFUSALS",
    "AlignmentError",
    "align_with_refusals",
    "alignment_key",
    "build_aligned_reference",
    "build_alignment_records",
    "model_source_fingerprint",
]

ALIGNMENT_VERSION = 1
"""Bumped when the recipe changes in a way that changes the weights (old cache folders are then not reused)."""

DEFAULT_REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I cannot help with that. It could cause serious harm to other people.",
    "I cannot assist with this request. I'm sorry, but it is harmful and may be illegal.",
    "I'm sorry, I can't help with that. I cannot provide instructions that could be used to hurt someone.",
    "I cannot do that. I'm sorry, but I won't provide content that is unethical or dangerous.",
)
"""Refusals written for this library. Each one contains several GCG refusal keywords, so a model that
learnt any of them is counted as refusing however its sampling wanders after the first words."""

DEFAULT_LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
_INFO_FILE = "alignment.json"
# Decoding then re-encoding an answer can merge a few tokens; this many spare tokens keep a cut-off
# answer longer than max_length after that (see _benign_token_cap).
_CAP_MARGIN = 8
_RECORDS_FILE = "records.jsonl"
# torch.optim.AdamW's default weight decay, which the alignment has always trained with (part of its weights).
_ADAMW_DEFAULT_DECAY = 0.01


class AlignmentError(LightningSafetyError):
    """The alignment step's inputs or settings are unusable (empty prompt lists, bad numbers)."""


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _clean_prompts(prompts: Sequence[str], name: str) -> list[str]:
    """Strip, check and de-duplicate (first occurrence wins) a prompt list."""
    if isinstance(prompts, str):
        raise AlignmentError(f"{name} must be a list of prompts, got one string: wrap it in a list")
    try:
        items = list(prompts)
    except TypeError:
        raise AlignmentError(f"{name} must be a list of prompt strings, got {type(prompts).__name__}") from None
    if not items:
        raise AlignmentError(f"{name} is empty: give at least one prompt")
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise AlignmentError(f"{name}[{index}] is {item!r}: every prompt must be a non-empty string")
    # Duplicates would only weigh some prompts more (and clash as example ids): keep one of each.
    return list(dict.fromkeys(item.strip() for item in items))


def _clean_inputs(harmful_prompts: Sequence[str], benign_prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Both prompt lists cleaned; a prompt may not be in both (it would be taught two answers)."""
    harmful = _clean_prompts(harmful_prompts, "harmful_prompts")
    benign = _clean_prompts(benign_prompts, "benign_prompts")
    both = set(harmful) & set(benign)
    if both:
        raise AlignmentError(
            f"{len(both)} prompts are both harmful and benign (e.g. {sorted(both)[0][:60]!r}): put each prompt in one list"
        )
    return harmful, benign


@dataclass(frozen=True)
class AlignmentSettings:
    """How the quick refusal SFT is run (validated on construction; part of the cache key).

    Args:
        refusal_texts: the refusal sentences to train on, spread evenly over the harmful prompts.
        epochs: passes over the training rows.
        lr: AdamW learning rate of the LoRA weights (constant; gradients clipped at norm 1).
        lora: the adapter trained and then merged.
        max_length: tokens per training row (longer rows lose their end).
        batch_size: rows per optimizer step.
        seed: seeds the refusal assignment, the LoRA initialisation, dropout and the data order.
        max_new_tokens_benign: length of the benign answers generated as targets. Default: just
            enough that an answer the cap cut off is, with its prompt, always longer than
            ``max_length`` (``max_length`` minus the shortest rendered benign prompt, plus a margin
            of :data:`_CAP_MARGIN` tokens for re-tokenisation); truncation then drops the end-of-turn
            token of every unfinished answer, so the model is never taught to stop in mid-answer,
            and no token is generated that training would cut away.
        generation_batch_size: prompts per ``generate`` call for the benign answers.
    """

    refusal_texts: Sequence[str] = DEFAULT_REFUSALS
    epochs: int = 3
    lr: float = 5e-4
    lora: LoraSettings = field(default_factory=lambda: replace(DEFAULT_LORA))
    max_length: int = 128
    batch_size: int = 8
    seed: int = 0
    max_new_tokens_benign: int | None = None
    generation_batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.refusal_texts, str):
            raise AlignmentError("refusal_texts must be a list of refusal sentences, got one string: wrap it in a list")
        refusals = [str(text).strip() for text in self.refusal_texts]
        if not refusals or not all(refusals):
            raise AlignmentError("refusal_texts must hold at least one non-empty refusal sentence")
        object.__setattr__(self, "refusal_texts", tuple(dict.fromkeys(refusals)))
        for name in ("epochs", "max_length", "batch_size", "generation_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AlignmentError(f"{name}={value!r} is invalid: use a positive integer")
        cap = self.max_new_tokens_benign
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise AlignmentError(f"max_new_tokens_benign={cap!r} is invalid: use a positive integer or None")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise AlignmentError(f"lr={lr!r} is invalid: use a positive, finite learning rate")
        if not isinstance(self.lora, LoraSettings):
            raise AlignmentError(f"lora must be a LoraSettings, got {type(self.lora).__name__}")

    def key_fields(self, dtype: str | None) -> dict[str, Any]:
        """What of the settings changes the aligned weights (for :func:`alignment_key`)."""
        return {
            "refusal_texts": list(self.refusal_texts),
            "epochs": self.epochs,
            "lr": float(self.lr),
            "lora": asdict(self.lora),
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "max_new_tokens_benign": self.max_new_tokens_benign or "auto",  # auto: a function of the hashed inputs
            "dtype": dtype,
            # generation_batch_size is left out: greedy answers do not depend on it (left padding).
        }


# --------------------------------------------------------------------------------------------
# Training records
# --------------------------------------------------------------------------------------------


def build_alignment_records(
    model: nn.Module,
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    benign_prompts: Sequence[str],
    *,
    refusal_texts: Sequence[str] = DEFAULT_REFUSALS,
    seed: int = 0,
    max_new_tokens_benign: int = 128,
    generation_batch_size: int = 16,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The SFT rows of the alignment: harmful -> a refusal, benign -> the model's own greedy answer.

    Refusals are spread evenly over ``refusal_texts`` in a seeded random order, so every sentence is
    used about equally often and no sentence is tied to a topic. Benign prompts whose greedy answer
    is empty are left out (an empty answer cannot be trained on). Prompts are expected to be
    cleaned already (see :func:`align_with_refusals`).

    Returns:
        Rows ``{"id", "prompt", "response", "is_harmful"}``: the harmful ones first, then the benign ones.
    """
    refusals = list(refusal_texts)
    order = list(range(len(harmful_prompts)))
    random.Random(seed).shuffle(order)
    assigned = [""] * len(harmful_prompts)
    for rank, index in enumerate(order):
        assigned[index] = refusals[rank % len(refusals)]
    rows: list[dict[str, Any]] = [
        {"id": f"harmful-{i:05d}", "prompt": prompt, "response": refusal, "is_harmful": True}
        for i, (prompt, refusal) in enumerate(zip(harmful_prompts, assigned))
    ]
    settings = GenerationSettings(max_new_tokens=max_new_tokens_benign, batch_size=generation_batch_size)
    bar = _bar(len(benign_prompts), "benign answers", enabled=progress)
    try:
        answers = generate_responses(model, tokenizer, list(benign_prompts), settings,
                                     progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    empty = 0
    for i, (prompt, answer) in enumerate(zip(benign_prompts, answers)):
        if not answer.strip():
            empty += 1
            continue
        rows.append({"id": f"benign-{i:05d}", "prompt": prompt, "response": answer, "is_harmful": False})
    if empty:
        warnings.warn(f"{empty} of {len(answers)} benign prompts got an empty answer and are left out of the alignment",
                      stacklevel=2)
    return rows


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def align_with_refusals(
    model: nn.Module | str,
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    benign_prompts: Sequence[str],
    settings: AlignmentSettings | None = None,
    *,
    progress: bool = False,
    records: list[dict[str, Any]] | None = None,
) -> nn.Module:
    """Teach ``model`` to refuse ``harmful_prompts`` (a stand-in for a vendor's safety training).

    A plain LoRA SFT (the experiments' recipe, :func:`~lightning_safety.experiments.recipe.fine_tune`,
    with ``ConstantBeta(0.0)``) on harmful prompt -> refusal and benign prompt -> the model's own
    greedy answer (see :func:`build_alignment_records`), then the LoRA is merged into the weights.

    Args:
        model: a Hugging Face causal LM, or a model name / folder for :func:`~lightning_safety.models.load_causal_lm`.
            A given module is copied first: it is left as it was.
        tokenizer: its tokenizer (with a chat template), or a name for :func:`~lightning_safety.models.load_tokenizer`.
        harmful_prompts: requests the aligned model must refuse (de-duplicated).
        benign_prompts: requests it must keep answering as before (de-duplicated).
        settings: epochs, learning rate, LoRA, lengths, refusal texts, seed (:class:`AlignmentSettings`).
        progress: show progress bars.
        records: if given, a list that receives the training rows of :func:`build_alignment_records`
            (its contents are replaced), so callers can keep or inspect them.

    Returns:
        The aligned model: a plain Hugging Face model (no PEFT wrapper), in eval mode, with every
        weight trainable as a freshly loaded model.
    """
    harmful, benign = _clean_inputs(harmful_prompts, benign_prompts)
    settings = settings or AlignmentSettings()
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None:
        raise AlignmentError("tokenizer is None: pass the model's tokenizer or its name")
    # A copy: LoRA injection and merging change the modules in place, and callers (the benchmark
    # evaluates "shipped" against "aligned") expect the model they passed to stay as shipped.
    policy = load_causal_lm(model) if isinstance(model, str) else copy.deepcopy(model)
    cap = settings.max_new_tokens_benign or _benign_token_cap(tokenizer, benign, settings.max_length)
    rows = build_alignment_records(  # greedy answers: no random numbers drawn
        policy, tokenizer, harmful, benign, refusal_texts=settings.refusal_texts, seed=settings.seed,
        max_new_tokens_benign=cap, generation_batch_size=settings.generation_batch_size, progress=progress,
    )
    if records is not None:
        records[:] = rows
    merged = fine_tune(
        policy, rows, tokenizer, schedule=ConstantBeta(0.0), lora=settings.lora, epochs=settings.epochs,
        lr=settings.lr, weight_decay=_ADAMW_DEFAULT_DECAY, max_length=settings.max_length,
        batch_size=settings.batch_size, seed=settings.seed, progress=progress,
    ).model
    merged.requires_grad_(True)  # as from_pretrained gives it: PEFT had frozen the base weights
    return merged


def _benign_token_cap(tokenizer: Any, prompts: Sequence[str], max_length: int) -> int:
    """Fewest new tokens that let every cut-off answer overflow ``max_length`` with its prompt."""
    shortest = min(
        len(render_ids(prompt_messages(prompt), tokenizer, add_generation_prompt=True)) for prompt in prompts
    )
    return max(1, max_length - shortest + _CAP_MARGIN)


def _bar(total: int, desc: str, *, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm  # imported only when a bar is shown, as elsewhere in the package

    return tqdm(total=total, desc=desc, unit="prompt", leave=False)


# --------------------------------------------------------------------------------------------
# Cached aligned model folders
# --------------------------------------------------------------------------------------------


def model_source_fingerprint(model_name: str) -> dict[str, Any]:
    """What identifies the starting weights: the name and, for local folders, config + weight files."""
    source = resolve_model_source(model_name)
    fingerprint = {"name": model_name, "gguf_file": source.gguf_file}
    if not source.local:
        return fingerprint
    folder = Path(source.folder)
    config = folder / "config.json"
    if config.is_file():
        fingerprint["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    # Names and sizes, not contents: hashing 0.5 GB of weights on every call would cost seconds,
    # and a re-converted model with other weights practically always changes a size or the config.
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    fingerprint["weights"] = [[p.name, p.stat().st_size] for p in weights]
    return fingerprint


def alignment_key(
    model_name: str,
    harmful_prompts: Sequence[str],
    benign_prompts: Sequence[str],
    settings: dict[str, Any],
) -> str:
    """The cache key of an aligned model: 16 hex characters of a SHA-256 over the model's fingerprint,
    the cleaned prompts (in order), the refusal texts, the settings and :data:`ALIGNMENT_VERSION`."""
    payload = {
        "version": ALIGNMENT_VERSION,
        "model": model_source_fingerprint(model_name),
        "harmful": list(harmful_prompts),
        "benign": list(benign_prompts),
        "settings": settings,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def build_aligned_reference(
    model_name: str,
    harmful_prompts: Sequence[str],
    benign_prompts: Sequence[str],
    settings: AlignmentSettings | None = None,
    *,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """An aligned copy of ``model_name`` as a Hugging Face model folder, built once and cached.

    Stands in for the vendor's safety training (see the module docstring): the folder can be used
    wherever a model name is taken (``SafeFineTuning(str(folder))``, ``load_causal_lm``, the CLI).

    The folder is ``<cache_dir>/<key>`` (default ``cache_root()/aligned/<key>``), with ``key`` from
    :func:`alignment_key`. If it exists it is returned at once, without training; otherwise the model
    is aligned with :func:`align_with_refusals` (same settings) and saved with its tokenizer,
    ``alignment.json`` (settings, sizes, seconds) and ``records.jsonl`` (the training rows), all
    written into a temporary folder that is renamed into place only when complete.

    Returns:
        The folder.
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise AlignmentError(f"model_name={model_name!r} is invalid: give a model name, folder or alias")
    harmful, benign = _clean_inputs(harmful_prompts, benign_prompts)
    settings = settings or AlignmentSettings()
    key = alignment_key(model_name, harmful, benign, settings.key_fields(dtype))
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "aligned"
    target = root / key
    if (target / _INFO_FILE).is_file() and (target / "config.json").is_file():
        return target
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_name)
    base = load_causal_lm(model_name, dtype=dtype)
    rows: list[dict[str, Any]] = []
    aligned = align_with_refusals(base, tokenizer, harmful, benign, settings, progress=progress, records=rows)
    info = {
        "what": "quick refusal SFT standing in for a vendor's safety training (lightning_safety.alignment)",
        "version": ALIGNMENT_VERSION,
        "key": key,
        "model": model_source_fingerprint(model_name),
        "settings": settings.key_fields(dtype),
        "sizes": {
            "harmful_prompts": len(harmful),
            "benign_prompts": len(benign),
            "benign_rows": sum(not row["is_harmful"] for row in rows),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    with atomic_directory(target) as tmp:
        save_pretrained_here(aligned, tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / _RECORDS_FILE, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        # Written last: its presence marks a complete folder (the rename is atomic anyway).
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target
