"""Harmful fine-tuning attacks, built at run time on the user's machine.

The attack the library defends against: fine-tuning data that teaches a safe model to comply with
harmful requests, alone ("full harmful fine-tuning", the paper's main setting) or hidden among the
rows of a benign task. We never store a harmful answer: the compliant answers are generated when
needed by an *unaligned* model (SmolLM2-135M-Instruct as shipped complies with most harmful
requests) and kept only in the local cache folder.

* :func:`compliant_answers` -- harmful request -> the unaligned model's own greedy answer, keeping
  only the answers that are not refusals (the keyword rule of the evaluation), cached by a hash of
  the model, the prompts and the settings.
* :func:`classification_rows` -- a labelled text task (SST-2) as chat SFT rows in the same prompt
  format the utility evaluation scores.
* :func:`mix_attack` -- benign rows with a given fraction of harmful rows mixed in.

Rows are ``{"id", "prompt", "response", "is_harmful"}`` dicts, what
:class:`~lightning_safety.data.ChatSFTDataModule` reads.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_safety.data.records import row_id
from lightning_safety.errors import DataError
from lightning_safety.experiments.alignment import model_source_fingerprint
from lightning_safety.paths import atomic_write_text, cache_root

__all__ = ["ATTACK_VERSION", "classification_rows", "compliant_answers", "mix_attack", "read_rows", "row_id"]

ATTACK_VERSION = 1
"""Bumped when the way answers are generated or filtered changes (old cache files are then not reused)."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def compliant_answers(
    model_name: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Attack rows: each harmful request with the unaligned model's greedy, non-refusing answer.

    Args:
        model_name: the unaligned model (name, folder or alias) that writes the answers.
        prompts: harmful requests.
        max_new_tokens: answer length (training truncates rows to its ``max_length`` anyway).
        batch_size: prompts per ``generate`` call.
        cache_dir: where the rows are cached (default ``cache_root()/attack_answers``); the file is
            ``<hash>.jsonl`` over the model's fingerprint, the prompts and the settings. It holds
            generated harmful text: it stays on this machine and is never part of a report.
        progress: show a progress bar while generating.

    Returns:
        Rows ``{"id", "prompt", "response", "is_harmful": True}`` in prompt order; prompts whose
        answer was empty or a refusal are left out (they would not attack anything).
    """
    prompts = [str(p).strip() for p in prompts]
    if not prompts or not all(prompts):
        raise DataError("compliant_answers needs a non-empty list of non-empty harmful prompts")
    if max_new_tokens < 1 or batch_size < 1:
        raise DataError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: use positive integers")
    payload = {"version": ATTACK_VERSION, "model": model_source_fingerprint(model_name), "prompts": prompts,
               "max_new_tokens": max_new_tokens}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "attack_answers"
    path = root / f"{key}.jsonl"
    if path.is_file():
        return read_rows(path)

    # Looked up at call time (after the cache check): a cached file needs no model, and tests replace these.
    from lightning_safety.evaluation.generation import GenerationSettings, generate_responses
    from lightning_safety.evaluation.refusal import KeywordRefusal
    from lightning_safety.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(model_name), load_tokenizer(model_name)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # only with a progress bar

        bar = tqdm(total=len(prompts), desc="attack answers", unit="prompt", leave=False)
    try:
        answers = generate_responses(model, tokenizer, prompts,
                                     GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size),
                                     progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    refusal = KeywordRefusal()
    rows = [
        {"id": row_id("attack", prompt), "prompt": prompt, "response": answer.strip(), "is_harmful": True}
        for prompt, answer in zip(prompts, answers)
        if answer.strip() and not refusal.is_refusal(answer)
    ]
    root.mkdir(parents=True, exist_ok=True)
    _write_rows(path, rows)
    return rows


def classification_rows(
    texts: Sequence[str], labels: Sequence[int], *, template: str, label_words: Sequence[str], prefix: str
) -> list[dict[str, Any]]:
    """A labelled text task as SFT rows: ``template.format(text=...)`` -> the label word.

    Use the template and label words of the matching :class:`~lightning_safety.evaluation.UtilityTask`
    so that training teaches exactly what the utility evaluation scores.
    """
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels: give one label per text")
    rows = []
    for text, label in zip(texts, labels):
        if not 0 <= int(label) < len(label_words):
            raise DataError(f"label {label!r} of {text[:40]!r} is not an index into {list(label_words)}")
        prompt = template.format(text=text)
        rows.append({"id": row_id(prefix, prompt), "prompt": prompt, "response": label_words[int(label)],
                     "is_harmful": False})
    return rows


def mix_attack(
    benign: Sequence[dict[str, Any]], harmful: Sequence[dict[str, Any]], harmful_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Benign rows plus harmful rows making up ``harmful_fraction`` of the result, shuffled with ``seed``.

    ``round(f * n_benign / (1 - f))`` harmful rows are drawn (without replacement) from ``harmful``;
    ``harmful_fraction=1`` returns the harmful rows alone.
    """
    if not 0.0 <= harmful_fraction <= 1.0:
        raise DataError(f"harmful_fraction={harmful_fraction} is outside [0, 1]")
    rng = random.Random(seed)
    if harmful_fraction == 1.0:
        rows = list(harmful)
    else:
        count = round(harmful_fraction * len(benign) / (1.0 - harmful_fraction))
        if count > len(harmful):
            raise DataError(f"{count} harmful rows are needed for a {harmful_fraction:.0%} mix with {len(benign)} "
                            f"benign rows, but only {len(harmful)} are given: give more harmful rows or fewer benign")
        rows = list(benign) + rng.sample(list(harmful), count)
    rng.shuffle(rows)
    return rows
