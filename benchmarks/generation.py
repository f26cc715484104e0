#!/usr/bin/env python
"""Batched generation against one prompt at a time, for safety evaluation.

What is measured
----------------
``lightning_safety.evaluation.generate_responses`` on the first ``--prompts`` AdvBench requests
(greedy, ``--max-new-tokens`` new tokens, chat template applied), once with ``batch_size=1`` (the
loop every evaluation script starts with) and once per batch size in ``--batch-sizes``. All runs
share one loaded model in one process; the order is interleaved over ``--repeats`` repetitions and
the median wall time of each configuration is reported with its speed-up over the one-at-a-time
loop. The responses of every batched run are compared with the one-at-a-time responses (greedy
decoding with left padding should give the same text; float rounding in padded batches can flip
a near-tie, so the count of identical responses is printed rather than asserted).

Reproduce
---------
::

    python benchmarks/generation.py                             # SmolLM2-135M-Instruct, 64 prompts
    python benchmarks/generation.py --model tiny-random-llama   # seconds: checks the machinery

Needs the public data folder (``../shared/data`` beside the repository) or ``--data``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lightning_safety.evaluation.generation import GenerationSettings, generate_responses
from lightning_safety.models import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "advbench_harmful_behaviors.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation.json"))
    args = parser.parse_args()

    with open(args.data, newline="") as handle:
        prompts = [row["goal"] for row in csv.DictReader(handle)][: args.prompts]
    model, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    sizes = [1] + [int(s) for s in args.batch_sizes.split(",")]
    times: dict[int, list[float]] = {size: [] for size in sizes}
    outputs: dict[int, list[str]] = {}
    generate_responses(model, tokenizer, prompts[:2], GenerationSettings(max_new_tokens=4, batch_size=2))  # warm-up
    for repeat in range(args.repeats):
        order = sizes[repeat % len(sizes) :] + sizes[: repeat % len(sizes)]
        for size in order:
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=size)
            start = time.perf_counter()
            outputs[size] = generate_responses(model, tokenizer, prompts, settings)
            times[size].append(time.perf_counter() - start)
            print(f"repeat {repeat} batch_size {size:>3}: {times[size][-1]:.2f} s", flush=True)
    single = statistics.median(times[1])
    rows = []
    for size in sizes:
        median = statistics.median(times[size])
        same = sum(a == b for a, b in zip(outputs[size], outputs[1]))
        rows.append({"batch_size": size, "median_s": round(median, 3), "speedup": round(single / median, 2),
                     "identical_to_single": same, "times_s": [round(t, 3) for t in times[size]]})
    result = {
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }
    print("\n| batch size | median time (s) | speed-up vs one at a time | responses identical to one at a time |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['median_s']:.2f} | {row['speedup']:.2f}x | "
              f"{row['identical_to_single']}/{len(prompts)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
