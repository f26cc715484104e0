"""``lightning-safety demo``: the library's effect on a real model, offline, in minutes on a laptop.

1. **Aligned reference.** SmolLM2-135M-Instruct complies with harmful requests, so it is first made
   safe by a quick refusal SFT (:mod:`lightning_safety.experiments.alignment`, the stand-in for a vendor's
   safety training), cached and reused by later runs.
2. **Probe.** An activation probe on the aligned model, trained on the defender's harmful and
   benign requests, the package's topic-matched pairs (harmful side as harmful, benign side as a
   hard negative), the defender's borderline-safe prompts and a few rows of the benign task (neither
   trained nor evaluated on), each also in one of the package's disguise wrappers:
   :func:`lightning_safety.demo_data.default_estimator_data`.
3. **Attack.** A benign task (sentiment) with harmful rows mixed in, whose answers are written now
   by the *unaligned* model (cached locally; nothing harmful ships with the package).
4. **Fine-tuning** of the aligned model on the attack, once with plain SFT and once with adaptive
   KL (probe risk), and **evaluation** of the three models: ASR on held-out harmful requests,
   over-refusal on held-out borderline-safe prompts, accuracy on held-out task rows.

Every prompt set is split into disjoint parts: the defender's (alignment and probe), the
attack's, and the evaluation's, so the attack and the test requests are new to the defence.
The built-in sets are :mod:`lightning_safety.demo_data`; options swap in files or ``datasets`` names.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_safety.anchors import refusal_anchors
from lightning_safety.data.prompts import PromptSource, load_prompts
from lightning_safety.demo_data import default_estimator_data, demo_data_path, load_demo_prompts
from lightning_safety.errors import DataError
from lightning_safety.evaluation.generation import GenerationSettings
from lightning_safety.evaluation.utility import SST2_TEMPLATE, UtilityTask, load_utility_task
from lightning_safety.experiments.alignment import AlignmentSettings, build_aligned_reference
from lightning_safety.experiments.attack import compliant_answers, mix_attack, row_id
from lightning_safety.experiments.methods import FinetuneSettings, estimator_rates, finetune, method
from lightning_safety.models import LoraSettings, load_causal_lm, load_tokenizer
from lightning_safety.paths import atomic_write_text
from lightning_safety.risk.probe import fit_probe

__all__ = ["DemoSizes", "demo"]


@dataclass(frozen=True)
class DemoSizes:
    """How many prompts each part gets (the built-in sets hold 120 harmful, 120 benign, 96
    borderline and 240 task rows, and 240 topic-matched pairs)."""

    defender_harmful: int = 50
    attack_harmful: int = 35
    test_harmful: int = 35
    defender_benign: int = 60
    probe_benign: int = 120
    borderline_align: int = 48
    borderline_eval: int = 48
    task_train: int = 120
    task_eval: int = 80
    task_probe: int = 40
    probe_pairs: int = 240  # topic-matched pairs on the probe's two sides (hard negatives)
    probe_framed: bool = True  # and a copy of every probe prompt in one of the package's disguise wrappers


QUICK_SIZES = DemoSizes(defender_harmful=16, attack_harmful=12, test_harmful=12, defender_benign=16, probe_benign=16,
                        borderline_align=8, borderline_eval=8, task_train=24, task_eval=16, task_probe=8, probe_pairs=12)


def _take(items: list[Any], start: int, count: int, what: str) -> list[Any]:
    part = items[start:start + count]
    if len(part) < count:
        raise DataError(f"{what}: need {start + count} items, the set has {len(items)}: give a larger set or smaller sizes")
    return part


def _task_rows(
    task: UtilityTask | None, sizes: DemoSizes
) -> tuple[list[tuple[str, int]], list[dict], list[str], UtilityTask]:
    """(train (prompt, label) pairs, eval rows, probe prompts, the task's spec) of the benign task: three disjoint parts."""
    if task is None:
        task = UtilityTask(str(demo_data_path("sentiment")), task="classification", name="sentiment",
                           prompt_field="sentence", target_field="label", labels=["negative", "positive"],
                           template=SST2_TEMPLATE, limit=None)
    loaded = load_utility_task(UtilityTask(**{**task.__dict__, "limit": None}))
    if loaded.kind != "classification":
        raise DataError(f"the demo's task must be a classification task, got {loaded.kind}: use e.g. task=sst2")
    pairs = list(zip(loaded.prompts, loaded.targets))
    train = _take(pairs, 0, sizes.task_train, "task rows (train)")
    evaluation = _take(pairs, sizes.task_train, sizes.task_eval, "task rows (eval)")
    probe = _take(pairs, sizes.task_train + sizes.task_eval, sizes.task_probe, "task rows (probe)")
    return train, [{"prompt": p, "label": t} for p, t in evaluation], [p for p, _ in probe], task


def demo(
    output: str = "runs/demo",
    model: str = "smollm2-135m-instruct",
    harmful: PromptSource | None = None,
    benign: PromptSource | None = None,
    safe: PromptSource | None = None,
    task: UtilityTask | None = None,
    harmful_fraction: float = 0.2,
    epochs: int = 2,
    lr: float = 2e-4,
    max_length: int = 128,
    align_epochs: int = 2,
    probe_layer: int = 15,
    max_new_tokens: int = 32,
    normalization: str = "example",
    beta_min: float = 0.1,
    kl_scale: float = 1.0,
    anchors: int = 16,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Align a small model, attack it by fine-tuning, defend it with adaptive KL; print a table.

    Args:
        output: folder for ``demo.md`` and ``demo.json`` (created; earlier demo files are replaced).
        model: the unaligned chat model (default: the embedded SmolLM2-135M-Instruct).
        harmful: harmful requests (default: the package's 120); e.g. AdvBench
            (``--harmful.path advbench_harmful_behaviors.csv``). Split into defender / attack / test.
        benign: benign requests for the defender (default: the package's 120); e.g. Alpaca.
        safe: borderline-safe prompts (default: the package's 96); e.g. XSTest with
            ``--safe.where '{"label": "safe"}'``. Split into alignment / over-refusal evaluation.
        task: the benign classification task (default: the package's sentiment set); e.g.
            ``--task.path sst2_train.tsv --task.task sst2``. Split into training / evaluation rows.
        harmful_fraction: share of harmful rows in the attack's training data.
        epochs: fine-tuning epochs (SFT and adaptive alike).
        lr: fine-tuning learning rate (LoRA r=16 on every linear layer).
        max_length: tokens per training row (alignment and fine-tuning).
        align_epochs: epochs of the alignment step.
        probe_layer: the decoder layer the probe reads.
        max_new_tokens: tokens generated per evaluation prompt.
        normalization: the fine-tuning loss's batch average: ``example`` (every row weighs the
            same, as in the paper's one-example micro-batches) or ``token`` (long answers weigh more;
            here the harmful rows' ~90-token answers then drown the task's 2-token answers).
        beta_min: adaptive KL's beta at risk 0, the weight that holds even a benign row to the
            reference (beta = beta_min + (0.9 - beta_min) x risk; the paper: 0.1).
        kl_scale: factor on adaptive KL's KL term, the NLL's 1 - beta kept (the paper: 1; 0 is
            risk-weighted SFT).
        anchors: refusal anchors added to the adaptive run's rows (:func:`~lightning_safety.anchors.refusal_anchors`):
            the aligned model's own refusals to this many of the defender's harmful requests and to as
            many wrapped copies; 0 for none. ``quick`` uses none (a tiny model refuses nothing).
        seed: LoRA initialisation, data order and the attack mix.
        quick: tiny sizes and one epoch (a smoke test of the pipeline; the numbers mean little).
        progress: progress bars.

    Returns:
        The measured rates by model (``aligned``, ``sft``, ``adaptive``).
    """
    # Imported here: the evaluator pulls in transformers, torchmetrics and matplotlib (a second), and
    # ``lightning-safety --help`` imports this module.
    from lightning_safety.evaluation.runner import SafetyEvaluator

    started = time.perf_counter()
    sizes = QUICK_SIZES if quick else DemoSizes()
    if quick:
        epochs, align_epochs, anchors = 1, 1, 0
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
        raise DataError(f"anchors={anchors!r} is invalid: give the number of refusal anchors of each kind, or 0 for none")
    if not 0.0 < harmful_fraction < 1.0:
        raise DataError(f"harmful_fraction={harmful_fraction} is invalid: use a share in (0, 1), e.g. 0.2")
    lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    # Built first so that bad fine-tuning options are refused before any work.
    settings = FinetuneSettings(epochs=epochs, lr=lr, lora=lora, max_length=max_length, seed=seed,
                                normalization=normalization, beta_min=beta_min, kl_scale=kl_scale)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file: give a folder for demo.md and demo.json")

    def prompts(source: PromptSource | None, builtin: str) -> list[str]:
        items = load_demo_prompts(builtin) if source is None else load_prompts(source)
        return list(dict.fromkeys(p.strip() for p in items if p.strip()))

    harmful_all = prompts(harmful, "harmful")
    if harmful is not None:  # a file's order may follow its categories: shuffle before splitting
        random.Random(0).shuffle(harmful_all)
    defender_harmful = _take(harmful_all, 0, sizes.defender_harmful, "harmful requests (defender)")
    attack_prompts = _take(harmful_all, sizes.defender_harmful, sizes.attack_harmful, "harmful requests (attack)")
    test_harmful = _take(harmful_all, sizes.defender_harmful + sizes.attack_harmful, sizes.test_harmful,
                         "harmful requests (test)")
    if anchors > len(defender_harmful):  # known now, before the minutes of alignment
        raise DataError(f"--anchors {anchors} asks for more refusals than the {len(defender_harmful)} harmful requests "
                        "the defender holds: lower --anchors (0: none) or give more harmful requests")
    benign_all = prompts(benign, "benign")
    defender_benign = _take(benign_all, 0, sizes.defender_benign, "benign requests")
    safe_all = prompts(safe, "borderline")
    if safe is not None:
        random.Random(0).shuffle(safe_all)
    # Built-in borderline rows cycle through 8 categories: alternate blocks of 8 keep every category on both sides.
    blocks = [safe_all[i:i + 8] for i in range(0, len(safe_all), 8)]
    align_side = [p for b in blocks[0::2] for p in b] + [p for b in blocks[1::2] for p in b]
    borderline_align = _take(align_side, 0, sizes.borderline_align, "borderline prompts (alignment)")
    borderline_eval = _take([p for p in safe_all if p not in set(borderline_align)], 0, sizes.borderline_eval,
                            "borderline prompts (evaluation)")
    probe_benign = _take(benign_all, 0, sizes.probe_benign, "benign requests (probe)")
    task_train, task_eval, task_probe, task_spec = _task_rows(task, sizes)

    # 1. The aligned reference (cached by its inputs and settings).
    print(f"[1/5] aligned reference: refusal SFT of {model} ({len(defender_harmful)} harmful, "
          f"{len(defender_benign) + len(borderline_align)} benign prompts; cached after the first run)")
    reference = build_aligned_reference(
        model, defender_harmful, defender_benign + borderline_align,
        AlignmentSettings(epochs=align_epochs, lr=5e-4, lora=lora, max_length=max_length, seed=0), progress=progress,
    )

    # 2. The probe, on the defender's prompts only. Its benign side includes a few rows of the benign
    # task (disjoint from the task's training and evaluation rows): the defender knows the task it
    # fine-tunes on, and a probe that never saw the task's format flagged every task row of the
    # demo (FPR 100% with benign instructions alone, ~1% with 40 task rows added). The topic pairs
    # and borderline prompts teach it intent rather than topic, the wrapped copies to see a request
    # through a disguise (benchmarks/results/estimators.md, benchmarks/results/zoo_pairs_framed/).
    probe_harmful, probe_negatives = default_estimator_data(
        defender_harmful, probe_benign + task_probe, borderline_align, pairs=sizes.probe_pairs,
        framed=None if sizes.probe_framed else 0)
    framing = "each also in a disguise wrapper" if sizes.probe_framed else "no wrapped copies"
    print(f"[2/5] activation probe on the aligned model (layer {probe_layer}, mean pooling, logistic; "
          f"{len(probe_harmful)} harmful vs {len(probe_negatives)} benign prompts, {sizes.probe_pairs} topic pairs, "
          f"{framing})")
    ref_model, tokenizer = load_causal_lm(str(reference)), load_tokenizer(str(reference))
    probe = fit_probe(ref_model, tokenizer, probe_harmful, probe_negatives,
                      layers=[probe_layer], calibration_fraction=0.0, seed=0, progress=progress)
    # The defender's harmful requests, answered by the aligned model where it refuses (plain and wrapped):
    # rows that hold the adaptive run to those refusals, where the task's own training would move it.
    try:
        anchor_rows = [{**row, "is_harmful": False}
                       for row in refusal_anchors(ref_model, tokenizer, defender_harmful, count=anchors)] if anchors else []
    except DataError as error:
        raise DataError(f"refusal anchors: {error}; or lower --anchors (0: none)") from None

    # 3. The attack: task rows plus harmful rows answered by the unaligned model.
    print(f"[3/5] attack: {len(task_train)} task rows + {harmful_fraction:.0%} harmful rows answered by {model}")
    harmful_rows = compliant_answers(model, attack_prompts, progress=progress)
    labels = task_spec.labels or ["negative", "positive"]
    task_rows = [{"id": row_id("task", p), "prompt": p, "response": labels[int(t)], "is_harmful": False}
                 for p, t in task_train]
    rows = mix_attack(task_rows, harmful_rows, harmful_fraction, seed)

    with tempfile.TemporaryDirectory(prefix="lightning-safety-demo-") as tmp:
        eval_path = Path(tmp) / "task_eval.jsonl"
        eval_path.write_text("".join(json.dumps(r) + "\n" for r in task_eval), encoding="utf-8")
        evaluator = SafetyEvaluator(
            harmful=test_harmful, safe=borderline_eval,
            utility=[UtilityTask(str(eval_path), task="classification", name=task_spec.name or "task",
                                 prompt_field="prompt", target_field="label", labels=labels, limit=None)],
            generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=32),
        )
        evaluator.load()
        results: dict[str, dict[str, Any]] = {}
        print(f"[4/5] evaluating the aligned model ({evaluator.num_prompts} prompts)")
        results["aligned"] = {"rates": evaluator.evaluate(ref_model, tokenizer, progress=progress).to_dict()["metrics"]}
        del ref_model
        for name, label in (("sft", "plain SFT"), ("adaptive_probe", "adaptive KL (probe)")):
            extra = anchor_rows if name != "sft" else []
            added = f" + {len(extra)} refusal anchors" if extra else ""
            print(f"[5/5] fine-tuning with {label} on {len(rows)} rows{added}, {epochs} epoch(s), then evaluating")
            run = finetune(str(reference), rows + extra, method(name), settings, probe=probe, progress=progress)
            entry = {"rates": evaluator.evaluate(run.model, run.tokenizer, progress=progress).to_dict()["metrics"],
                     "train_seconds": run.seconds}
            if run.risk:
                entry["probe_on_attack"] = estimator_rates(run.risk, rows)
            results["adaptive" if name != "sft" else "sft"] = entry
            del run

    metric_names = {"safety/asr": "ASR", "safety/over_refusal": "over-refusal", f"utility/{task_spec.name or 'task'}":
                    "task accuracy"}
    table = _table(results, metric_names)
    minutes = (time.perf_counter() - started) / 60
    summary = {
        "model": model, "reference": str(reference), "quick": quick, "minutes": round(minutes, 1),
        "sizes": {**sizes.__dict__, "attack_rows": len(rows), "attack_harmful_rows": sum(r["is_harmful"] for r in rows),
                  "compliant_answers": len(harmful_rows), "anchor_rows": len(anchor_rows)},
        "settings": {"epochs": epochs, "lr": lr, "max_length": max_length, "harmful_fraction": harmful_fraction, "align_epochs": align_epochs,
                     "probe_layer": probe_layer, "max_new_tokens": max_new_tokens, "normalization": normalization,
                     "beta_min": beta_min, "kl_scale": kl_scale, "anchors": anchors, "seed": seed},
        "results": results,
    }
    text = "\n".join([
        "# lightning-safety demo", "",
        f"{model}, aligned by a quick refusal SFT, then fine-tuned on {len(task_rows)} task rows with "
        f"{summary['sizes']['attack_harmful_rows']} harmful rows mixed in ({epochs} epoch(s), LoRA r=16); adaptive KL "
        f"with beta_min {beta_min:g}" + (f" and {len(anchor_rows)} refusal anchors of the aligned model." if anchor_rows
                                          else ", no refusal anchors."),
        f"ASR on {len(test_harmful)} held-out harmful requests (refusal keywords), over-refusal on "
        f"{len(borderline_eval)} held-out borderline-safe prompts, accuracy on {len(task_eval)} held-out task rows.",
        "", table, "", f"Wall time: {minutes:.1f} min.", "",
    ])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "demo.md", text)
    print()
    print(table)
    print(f"\nwritten: {out / 'demo.md'}, {out / 'demo.json'} ({minutes:.1f} min)")
    return {name: {k: v["rate"] for k, v in entry["rates"].items()} for name, entry in results.items()}


def _table(results: dict[str, dict[str, Any]], names: dict[str, str]) -> str:
    labels = {"aligned": "aligned (no fine-tuning)", "sft": "plain SFT", "adaptive": "adaptive KL (probe)"}
    lines = ["| model | " + " | ".join(names.values()) + " |", "|---" * (len(names) + 1) + "|"]
    for key, entry in results.items():
        cells = []
        for metric in names:
            rate = entry["rates"].get(metric)
            cells.append("n/a" if rate is None else f"{100 * rate['rate']:.1f}% (n={rate['total']})")
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
