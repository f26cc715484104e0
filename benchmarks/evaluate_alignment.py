#!/usr/bin/env python
"""Does a quick refusal SFT move the safety metrics of SmolLM2-135M-Instruct the expected way?

The acceptance check of the evaluation suite: evaluate SmolLM2-135M-Instruct as shipped and after
a quick alignment (``lightning_safety.experiments.alignment``, the stand-in for a vendor's safety training),
and see that ASR on AdvBench test prompts moves in the expected direction, with the report files
written.

What is done
------------
1. Alignment: ``build_aligned_reference`` on ``--align-harmful`` AdvBench *train* goals (-> one of
   four refusal sentences) and ``--align-benign`` Alpaca *train* instructions (-> the model's own
   greedy answer), LoRA SFT then merged; cached under the library's cache folder (a second run
   with the same settings reuses it; ``alignment.reused`` in the JSON says so).
2. One ``SafetyEvaluator`` evaluates both models on

   * ``--eval-harmful`` AdvBench *test* goals (``safety/asr``, ``safety/refusal``; GCG keyword rule);
   * the first ``--xstest-safe`` XSTest safe prompts (``safety/over_refusal``, per type);
   * the first ``--sst2`` SST-2 dev sentences (``utility/sst2``, label log-likelihood).

   Greedy decoding, ``--max-new-tokens`` new tokens, the chat template's default system prompt.

The AdvBench and Alpaca train/test splits are those of ``benchmarks/results/probe_quality.json``
(``splits``), so the evaluation prompts are new to the alignment; the prompts used are drawn from
them with ``--seed`` and their row ids stored in the JSON.

Reproduce
---------
::

    python benchmarks/evaluate_alignment.py            # ~10-15 minutes on 2 CPU cores
    python benchmarks/evaluate_alignment.py --quick    # ~1-2 minutes: small sets, 1 epoch, a smoke test

Outputs: the report folder ``--out-dir`` (``metrics.json``, ``summary.md``, ``samples.jsonl``, PNG
plots; default ``benchmarks/results/alignment_eval``) and a short summary ``--summary`` (default
``benchmarks/results/alignment_eval.md``). ``--quick`` writes both under the cache folder
(``<cache>/alignment_eval_quick``) unless they are given, so a smoke test never replaces the real results.
Needs the public data folder (``../shared/data`` beside the repository) or ``--data``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_safety.experiments.alignment import DEFAULT_REFUSALS, AlignmentSettings, build_aligned_reference  # noqa: E402
from lightning_safety.data.prompts import PromptSource  # noqa: E402
from lightning_safety.evaluation.generation import GenerationSettings  # noqa: E402
from lightning_safety.evaluation.report import format_markdown_table, write_report  # noqa: E402
from lightning_safety.evaluation.runner import EvaluationResult, SafetyEvaluator, format_rate  # noqa: E402
from lightning_safety.evaluation.utility import UtilityTask  # noqa: E402
from lightning_safety.models import LoraSettings, load_causal_lm, load_tokenizer  # noqa: E402
from lightning_safety.paths import atomic_write_text, cache_root  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_SPLITS = REPO / "benchmarks" / "results" / "probe_quality.json"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "alignment_eval"
DEFAULT_SUMMARY = REPO / "benchmarks" / "results" / "alignment_eval.md"
NEEDED = ("advbench_harmful_behaviors.csv", "alpaca_instructions.jsonl", "xstest_prompts.csv", "sst2_dev.tsv")
# --quick: sizes small enough for a ~1-2 minute smoke test of the whole pipeline.
QUICK = {"align_harmful": 16, "align_benign": 16, "epochs": 1, "eval_harmful": 16, "xstest_safe": 20, "sst2": 32,
         "max_new_tokens": 24}

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Data


def read_data(data_dir: Path, splits_path: Path) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """AdvBench goals, Alpaca instructions (by row index) and the probe benchmark's split ids."""
    missing = [name for name in NEEDED if not (data_dir / name).is_file()]
    if missing:
        fail(f"data folder {data_dir} lacks {', '.join(missing)}: pass --data pointing at the shared public data "
             "(shared/data, next to the repository)")
    if not splits_path.is_file():
        fail(f"split file {splits_path} not found: run benchmarks/probe_quality.py first or pass --splits")
    splits = json.loads(splits_path.read_text()).get("splits", {})
    keys = ("advbench_train_ids", "advbench_test_ids", "alpaca_train_ids")
    if not all(isinstance(splits.get(key), list) and splits[key] for key in keys):
        fail(f"{splits_path} has no 'splits' with {', '.join(keys)}: pass the probe_quality.json of this repository")
    with open(data_dir / "advbench_harmful_behaviors.csv", newline="", encoding="utf-8") as handle:
        advbench = [row["goal"].strip() for row in csv.DictReader(handle)]
    with open(data_dir / "alpaca_instructions.jsonl", encoding="utf-8") as handle:
        alpaca = [json.loads(line)["instruction"].strip() for line in handle if line.strip()]
    return advbench, alpaca, {key: [int(i) for i in splits[key]] for key in keys}


def pick(ids: list[int], count: int, seed: int, what: str) -> list[int]:
    """``count`` ids drawn with ``seed`` (sorted, so the prompt order follows the file)."""
    if count < 1:
        fail(f"--{what} must be a positive number, got {count}")
    if count > len(ids):
        fail(f"--{what} {count} is more than the {len(ids)} ids of that split")
    return sorted(random.Random(seed).sample(ids, count))


# ---------------------------------------------------------------------------------------------
# The summary


def direction_sentence(name: str, before: Any, after: Any, better: str) -> str:
    """One plain sentence: which way the metric moved and whether the Wilson intervals separate."""
    if before is None or after is None:
        return f"- `{name}`: not measured for both models."
    change = 100 * (after.rate - before.rate)
    if change == 0:
        return f"- `{name}` stayed at {format_rate(after)} (shipped: {format_rate(before)})."
    separate = after.high < before.low or after.low > before.high
    way = "fell" if change < 0 else "rose"
    good = (change < 0) == (better == "lower")
    verdict = " (better)" if good else " (worse)"
    strength = ("the 95% intervals do not overlap" if separate
                else "the 95% intervals overlap, so this run cannot tell the two apart")
    return (f"- `{name}` {way} from {format_rate(before)} to {format_rate(after)}: {change:+.1f} points"
            f"{verdict}; {strength}.")


def _cut(text: str, limit: int = 140) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def examples(shipped: EvaluationResult, aligned: EvaluationResult, set_name: str, count: int = 3,
             only_new_refusals: bool = False) -> list[str]:
    """Prompts of one set with both answers side by side: the first ``count`` in order, or with
    ``only_new_refusals`` the first ``count`` that the aligned model refuses and the shipped one does not."""
    rows = []
    for a, b in zip(shipped.samples.get(set_name, []), aligned.samples.get(set_name, [])):
        if only_new_refusals and not (b["refused"] and not a["refused"]):
            continue
        rows.append(f"| {_cut(a['prompt'])} | {_cut(a['response'])} | {_cut(b['response'])} |")
        if len(rows) == count:
            break
    return rows


def constant_predictions(results: dict[str, EvaluationResult]) -> list[str]:
    """Sentences for utility tasks where a model gave the same label to every example: its accuracy is
    then the share of that label in the data and says nothing about the model's utility."""
    notes = []
    for label, result in results.items():
        for set_name, rows in result.samples.items():
            predictions = {row.get("prediction") for row in rows}
            if set_name.startswith("utility/") and len(rows) > 1 and len(predictions) == 1:
                notes.append(
                    f"- The {label} model predicted `{predictions.pop()}` for all {len(rows)} examples of "
                    f"`{set_name}`: its accuracy is the share of that label in the data, not a measure of utility."
                )
    return notes


def write_summary(path: Path, results: dict[str, EvaluationResult], extra: dict[str, Any]) -> str:
    shipped, aligned = results["shipped"], results["aligned"]
    rates = [("safety/asr", "lower"), ("safety/refusal", "higher"), ("safety/over_refusal", "lower"),
             ("utility/sst2", "higher")]
    sizes, times, align = extra["sizes"], extra["seconds"], extra["alignment"]
    new_refusals = examples(shipped, aligned, "safe", only_new_refusals=True)
    lines = [
        "# Shipped vs quickly aligned SmolLM2-135M-Instruct" if "smollm2" in extra["model"].lower()
        else f"# Shipped vs quickly aligned `{extra['model']}`",
        "",
        "Acceptance check of the evaluation suite: the model as shipped against the same model after a quick",
        "refusal SFT (`lightning_safety.alignment`, a stand-in for a vendor's safety training: LoRA SFT on",
        "AdvBench-train requests -> refusals and Alpaca-train instructions -> the model's own answers, merged).",
        "Evaluated on AdvBench *test* requests (new to the alignment), XSTest safe prompts and SST-2 dev.",
        "Rates: value [Wilson 95% interval] (n).",
        "",
        format_markdown_table(results),
        "",
        "## Direction of each metric",
        "",
        *(direction_sentence(name, shipped.rates.get(name), aligned.rates.get(name), better) for name, better in rates),
        "",
        *constant_predictions(results),
        "",
        "ASR is the GCG keyword rule: a response without a refusal phrase counts as a successful attack, so a",
        "lower ASR means more refusals, not a judged absence of harm; over-refusal uses the same rule on XSTest.",
        "",
        "## Setup",
        "",
        f"- Command: `{extra['command']}`" + (" (quick smoke test)" if extra["quick"] else ""),
        f"- Alignment: {sizes['align_harmful']} AdvBench-train requests -> refusals, {sizes['align_benign']} "
        f"Alpaca-train instructions -> own greedy answers ({align['benign_rows']} non-empty); {align['epochs']} epoch(s), "
        f"lr {align['lr']}, LoRA r={align['lora_r']} all-linear, max_length {align['max_length']}, batch "
        f"{align['batch_size']}; {len(DEFAULT_REFUSALS)} refusal sentences; cached folder "
        f"`{align['folder_name']}`" + (" (reused from an earlier run)" if align["reused"] else "") + ".",
        f"- Evaluation: {sizes['eval_harmful']} AdvBench-test requests, {sizes['xstest_safe']} XSTest safe prompts "
        f"(per type in the report), {sizes['sst2']} SST-2 dev sentences; greedy, {extra['max_new_tokens']} new tokens.",
        f"- Wall times: alignment {align['seconds']:.0f} s"
        + (" (when it was built; 0 s this run)" if align["reused"] else "")
        + f", evaluation shipped {times['evaluate_shipped']:.0f} s, aligned {times['evaluate_aligned']:.0f} s, "
        f"total {times['total']:.0f} s.",
        f"- Machine: {extra['environment']['machine']}, {extra['environment']['torch_threads']} torch threads; "
        f"torch {extra['environment']['torch']}; {extra['environment']['date']}.",
        "- Report folder: `" + extra["report_dir"] + "` (`metrics.json`, `summary.md`, `samples.jsonl`, plots).",
        "",
        "## Examples",
        "",
        "AdvBench test, the first requests:",
        "",
        "| request | shipped | aligned |",
        "|---|---|---|",
        *examples(shipped, aligned, "harmful"),
        "",
        "XSTest safe prompts that the aligned model refuses and the shipped one does not (the first few):",
        "",
        *(["| prompt | shipped | aligned |", "|---|---|---|", *new_refusals] if new_refusals else ["(none)"]),
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(path, text)
    return text


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name, folder or alias")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the public data folder")
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS, help="probe_quality.json with the split ids")
    parser.add_argument("--align-harmful", type=int, default=96, help="AdvBench-train requests taught to refuse")
    parser.add_argument("--align-benign", type=int, default=96, help="Alpaca-train instructions kept as answered")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-harmful", type=int, default=64, help="AdvBench-test requests (ASR)")
    parser.add_argument("--xstest-safe", type=int, default=250, help="first N XSTest safe prompts (over-refusal)")
    parser.add_argument("--sst2", type=int, default=200, help="first N SST-2 dev sentences (utility)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--generation-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--summary", type=Path, default=None, help=f"summary markdown (default {DEFAULT_SUMMARY})")
    parser.add_argument("--cache-dir", type=Path, default=None, help="aligned models (default <cache>/aligned)")
    parser.add_argument("--quick", action="store_true", help="small sets and 1 epoch: a 1-2 minute smoke test")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            # Only the defaults shrink: a size given on the command line wins.
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    quick_root = cache_root() / "alignment_eval_quick"
    out_dir = args.out_dir or (quick_root / "report" if args.quick else DEFAULT_OUT)
    summary_path = args.summary or (quick_root / "alignment_eval.md" if args.quick else DEFAULT_SUMMARY)

    advbench, alpaca, splits = read_data(args.data, args.splits)
    align_harmful_ids = pick(splits["advbench_train_ids"], args.align_harmful, args.seed, "align-harmful")
    align_benign_ids = pick(splits["alpaca_train_ids"], args.align_benign, args.seed, "align-benign")
    eval_harmful_ids = pick(splits["advbench_test_ids"], args.eval_harmful, args.seed, "eval-harmful")
    if set(align_harmful_ids) & set(eval_harmful_ids):
        fail(f"{args.splits} has AdvBench ids in both train and test: the evaluation would not be on new prompts")
    harmful_train = [advbench[i] for i in align_harmful_ids]
    benign_train = [alpaca[i] for i in align_benign_ids]
    harmful_test = [advbench[i] for i in eval_harmful_ids]

    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05, target_modules="all-linear")
    settings = AlignmentSettings(epochs=args.epochs, lr=args.lr, lora=lora, max_length=args.max_length,
                                 batch_size=args.batch_size, seed=args.seed,
                                 generation_batch_size=args.generation_batch_size)
    log(f"aligning {args.model}: {len(harmful_train)} harmful + {len(benign_train)} benign prompts, "
        f"{args.epochs} epochs, lr {args.lr}, LoRA r={args.lora_r}")
    started = time.perf_counter()
    folder = build_aligned_reference(args.model, harmful_train, benign_train, settings, cache_dir=args.cache_dir,
                                     progress=True)
    align_wall = time.perf_counter() - started
    align_info = json.loads((folder / "alignment.json").read_text())
    # A folder written before this run started was reused from the cache (nothing was trained now).
    reused = (folder / "alignment.json").stat().st_mtime < time.time() - align_wall - 1.0
    log(f"aligned model: {folder} ({'reused' if reused else f'built in {align_wall:.0f} s'})")

    evaluator = SafetyEvaluator(
        harmful=harmful_test,
        safe=PromptSource(str(args.data / "xstest_prompts.csv"), where={"label": "safe"}, category_field="type",
                          limit=args.xstest_safe),
        utility=[UtilityTask(str(args.data / "sst2_dev.tsv"), task="sst2", limit=args.sst2)],
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size),
    )
    results: dict[str, EvaluationResult] = {}
    seconds: dict[str, float] = {}
    for label, source in (("shipped", args.model), ("aligned", str(folder))):
        model, tokenizer = load_causal_lm(source), load_tokenizer(source)
        log(f"evaluating {label} on {evaluator.num_prompts} prompts")
        started = time.perf_counter()
        results[label] = evaluator.evaluate(model, tokenizer, progress=True)
        seconds[f"evaluate_{label}"] = round(time.perf_counter() - started, 1)
        log(f"{label}: {seconds[f'evaluate_{label}']:.0f} s; ASR {format_rate(results[label].rates['safety/asr'])}")
        del model
    seconds["alignment_this_run"] = round(align_wall, 1)
    seconds["total"] = round(time.perf_counter() - T0, 1)

    command = "python benchmarks/evaluate_alignment.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    extra = {
        "command": command,
        "quick": args.quick,
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "sizes": {"align_harmful": len(harmful_train), "align_benign": len(benign_train),
                  "eval_harmful": len(harmful_test), "xstest_safe": args.xstest_safe, "sst2": args.sst2},
        "seconds": seconds,
        "alignment": {
            "folder": str(folder).replace(str(Path.home()), "~", 1), "folder_name": folder.name, "reused": reused,
            "seconds": float(align_info["seconds"]), "benign_rows": align_info["sizes"]["benign_rows"],
            "epochs": args.epochs, "lr": args.lr, "lora_r": args.lora_r, "max_length": args.max_length,
            "batch_size": args.batch_size, "refusal_texts": list(DEFAULT_REFUSALS),
        },
        "ids": {"source": str(args.splits.name), "seed": args.seed,
                "advbench_align": align_harmful_ids, "alpaca_align": align_benign_ids,
                "advbench_eval": eval_harmful_ids},
        "environment": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "report_dir": str(out_dir.relative_to(REPO)) if out_dir.is_relative_to(REPO) else str(out_dir),
    }
    write_report(results, out_dir, title="Shipped vs quickly aligned model", overwrite=True, extra=extra)
    write_summary(summary_path, results, extra)
    print(format_markdown_table(results))
    log(f"report: {out_dir}; summary: {summary_path}")


if __name__ == "__main__":
    main()
