#!/usr/bin/env python
"""Step time and memory of adaptive KL against plain SFT (LoRA; the reference is the adapter switched off).

What is measured
----------------
One ``SafeFineTuning`` module (LoRA, ``reference="adapter_disabled"``, AdamW over the adapter) and
one fixed, seeded batch of random token ids ``[B, T]``: the first ``--prompt-len`` tokens of each
row are prompt (label -100), the rest are response tokens. One *step* is
``training_step`` -> ``backward`` -> ``optimizer.step`` -> ``zero_grad``. The configurations differ
only in ``module.schedule`` and ``batch["risk"]``, so they share the same weights and the same
single copy of the model:

* ``sft``: ``ConstantBeta(0.0)``, plain SFT; the reference never runs.
* ``adaptive_all``: ``LinearRiskSchedule(0.1, 0.9)`` with uniform random risk: every row has
  beta > 0, so the reference runs on all ``B`` rows.
* ``adaptive_25``: ``ThresholdRiskSchedule(0.5, beta_low=0.0, beta_high=0.9)`` with a quarter of
  the rows at risk 1 and the rest at 0: the reference runs on those ``B/4`` rows only.

Also timed alone: the reference forward (``SafeFineTuning.reference_forward``, no
gradients) on all ``B`` rows (``ref_all``) and on the risky rows (``ref_25``). The *limit* of a
configuration is what it cannot beat: ``median(sft) + median(reference forward on the rows it
needs)``; the table gives each configuration's median step as a ratio to SFT and to its limit.
All five timings run in one process, interleaved (each repetition runs every timing once, in a
rotating order), and the medians are reported. The number of rows the reference ran on is counted
during the timed steps and checked against the configuration (0, ``B``, ``B/4``).

Peak memory: one fresh subprocess per configuration (this script with ``--memory-worker``) builds
the same module, runs the warm-up and 2 steps, and reports its peak: on CUDA
``torch.cuda.max_memory_allocated`` after a reset of the peak once set up; on CPU the process peak
RSS (``VmHWM``, the high-water mark ``getrusage(RUSAGE_SELF).ru_maxrss`` reports, which is the
fallback) after every weight was read once (memory-mapped safetensors become resident only when
touched) and the mark was reset to the RSS then (``/proc/self/clear_refs``, so that model loading
does not count). That RSS is reported as the baseline, so that ``peak - baseline`` is the training
step's working set (activations, logits, AdamW state, allocator caches). The target is adaptive KL
within 5% of plain LoRA SFT, i.e. no second copy of the weights; that is also checked directly:
the bytes of the module's unique parameter storages against those of the bare base model should
differ by the LoRA weights only.

Reproduce
---------
::

    python benchmarks/overhead.py                              # SmolLM2-135M-Instruct, B=8, T=128, 7 repeats
    python benchmarks/overhead.py --model tiny-random-llama    # seconds: checks the machinery
    python benchmarks/overhead.py --out overhead.md            # also write the markdown table

Run it on an otherwise idle machine: other jobs skew both the timings and the RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steptime import (TRAIN_CONFIGS, LoraSetup, add_run_arguments, build_lora_setup, check_run_arguments,
                      counting_reference_rows, environment_text, measure_peak, memory_measure_note, mib_text,
                      pick_device, prepare_process, risky_row_count, run_interleaved, run_memory_worker, seconds_text,
                      train_step, unique_storage_bytes)

_RESULT_PREFIX = "OVERHEAD_MEMORY_RESULT "
_MEMORY_STEPS = 2


# ----------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Median step time and peak memory of adaptive KL vs plain SFT (LoRA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model alias, folder, GGUF or hub id")
    parser.add_argument("--dtype", default=None, help="weights dtype (float32, bfloat16, float16); default: the library's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64, help="leading tokens per row with label -100")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions of every configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--chunk-size", type=int, default=None, help="SafeFineTuning(chunk_size=...)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    add_run_arguments(parser, TRAIN_CONFIGS)
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    return args


def worker_argv(args: argparse.Namespace, config: str) -> list[str]:
    """Command line that re-runs this script as a memory worker with the same settings."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-worker", config,
        "--model", args.model,
        "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len),
        "--prompt-len", str(args.prompt_len),
        "--lora-r", str(args.lora_r),
        "--warmup", str(args.warmup),
        "--seed", str(args.seed),
    ]  # fmt: skip
    for flag, value in (("--dtype", args.dtype), ("--chunk-size", args.chunk_size), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


# ----------------------------------------------------------------------------------- setup
def build_setup(args: argparse.Namespace, device: torch.device) -> LoraSetup:
    """One LoRA module with AdamW, and the fixed batch with each configuration's risk."""
    return build_lora_setup(
        args.model,
        device=device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        prompt_len=args.prompt_len,
        lora_r=args.lora_r,
        seed=args.seed,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
    )


def _expected_rows_per_step(args: argparse.Namespace, config: str) -> int:
    return {"sft": 0, "adaptive_all": args.batch_size, "adaptive_25": risky_row_count(args.batch_size)}[config]


# ----------------------------------------------------------------------------------- one step
def reference_forward(setup: LoraSetup, rows: Tensor | None) -> None:
    """The frozen reference's forward alone (no_grad, adapter off), on all rows or ``rows``."""
    from lightning_safety.losses import ProjectedLogits

    batch = setup.batches["sft"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if rows is not None:  # the same row selection compute_loss does
        input_ids, attention_mask = input_ids[rows], attention_mask[rows]
    module = setup.module
    keep = module._logits_to_keep(batch["labels"])  # the same output-layer positions the step uses
    logits = module.reference_forward(input_ids, attention_mask, logits_to_keep=keep)
    if isinstance(logits, ProjectedLogits):  # the step projects per chunk; the cost is the same
        logits.materialize()


def timing_actions(setup: LoraSetup) -> dict[str, Callable[[], None]]:
    return {
        "sft": lambda: train_step(setup, "sft"),
        "adaptive_all": lambda: train_step(setup, "adaptive_all"),
        "adaptive_25": lambda: train_step(setup, "adaptive_25"),
        "ref_all": lambda: reference_forward(setup, None),
        "ref_25": lambda: reference_forward(setup, setup.risky_rows),
    }


# ----------------------------------------------------------------------------------- timings
@dataclass
class TimingResult:
    times: dict[str, list[float]]  # timed repetitions per configuration
    reference_rows: dict[str, float]  # mean reference rows per step, counted
    expected_rows: dict[str, int]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


def run_timings(args: argparse.Namespace, setup: LoraSetup) -> TimingResult:
    actions = timing_actions(setup)
    counted: dict[str, list[int]] = {name: [] for name in TRAIN_CONFIGS}
    with counting_reference_rows() as rows:

        def counting(name: str, action: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                before = len(rows)
                action()
                counted[name].append(sum(rows[before:]))

            return run

        for name in TRAIN_CONFIGS:
            actions[name] = counting(name, actions[name])
        times = run_interleaved(actions, warmup=args.warmup, repeats=args.repeats, device=setup.device, tag="overhead")
    return TimingResult(
        times=times,
        reference_rows={name: statistics.fmean(values) for name, values in counted.items()},
        expected_rows={name: _expected_rows_per_step(args, name) for name in TRAIN_CONFIGS},
    )


# ----------------------------------------------------------------------------------- weights
@dataclass
class WeightBytes:
    module: int  # unique parameter storages of the SafeFineTuning module
    bare: int  # unique parameter storages of the base model loaded alone
    lora: int  # trainable (LoRA) parameters
    reference_strategy: str
    separate_reference: bool  # whether the module holds a reference module of its own

    @property
    def no_second_copy(self) -> bool:
        return not self.separate_reference and self.module - self.bare == self.lora


def weight_bytes(args: argparse.Namespace, setup: LoraSetup) -> WeightBytes:
    from lightning_safety.models import load_causal_lm

    module = setup.module
    bare_model = load_causal_lm(args.model, dtype=args.dtype)
    bare = unique_storage_bytes(bare_model.parameters())
    del bare_model
    gc.collect()
    return WeightBytes(
        module=unique_storage_bytes(module.parameters()),
        bare=bare,
        lora=unique_storage_bytes(module.trainable_parameters()),
        reference_strategy=module.reference_strategy,
        separate_reference=module.reference is not None,
    )


# ----------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: set up, reset the peak, warm up, run 2 steps; baseline and peak in bytes."""
    device = pick_device()
    setup = build_setup(args, device)
    config = args.memory_worker
    with counting_reference_rows() as rows:
        measured = measure_peak(device, [setup.module], lambda: train_step(setup, config), args.warmup + _MEMORY_STEPS)
    return {"config": config, **measured, "reference_rows": sum(rows)}


def run_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for config in TRAIN_CONFIGS:
        print(f"[overhead] memory: {config} in a fresh process", file=sys.stderr, flush=True)
        result = run_memory_worker(worker_argv(args, config), _RESULT_PREFIX, config)
        expected = _expected_rows_per_step(args, config) * result["steps"]
        if result["reference_rows"] != expected:
            raise RuntimeError(
                f"memory worker '{config}': the reference ran on {result['reference_rows']} rows, expected {expected}"
            )
        results[config] = result
    return results


# ----------------------------------------------------------------------------------- report
def environment_line(args: argparse.Namespace, setup: LoraSetup) -> str:
    dtype = next(setup.module.policy.parameters()).dtype
    return (
        f"model `{args.model}` ({str(dtype).removeprefix('torch.')}), B x T = {args.batch_size} x {args.seq_len} "
        f"({args.seq_len - args.prompt_len} response tokens per row), LoRA r={args.lora_r} all-linear, "
        f"chunk_size={args.chunk_size}; {environment_text(setup.device)}; {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up round(s)"
    )


def timing_table(result: TimingResult, setup: LoraSetup) -> list[str]:
    size = int(setup.batches["sft"]["input_ids"].shape[0])
    risky = int(setup.risky_rows.numel())
    labels = {
        "sft": "plain SFT: `ConstantBeta(0)`",
        "adaptive_all": "adaptive KL, all rows: `LinearRiskSchedule(0.1, 0.9)`, uniform risk",
        "adaptive_25": f"adaptive KL, beta_min = 0, {risky}/{size} rows risky: `ThresholdRiskSchedule(0.5, 0, 0.9)`",
    }
    needed = {"sft": None, "adaptive_all": "ref_all", "adaptive_25": "ref_25"}
    sft = result.median("sft")
    lines = [
        "| Configuration | Reference rows / step | Median step (s) | Min - max (s) | x SFT | Limit (s) | x limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TRAIN_CONFIGS:
        median = result.median(name)
        ref = needed[name]
        limit = sft + (result.median(ref) if ref else 0.0)
        counted, expected = result.reference_rows[name], result.expected_rows[name]
        rows = f"{counted:g}" if counted == expected else f"{counted:g} (expected {expected}!)"
        lines.append(
            f"| `{name}`: {labels[name]} | {rows} | {seconds_text(median)} | {seconds_text(min(result.times[name]))} - "
            f"{seconds_text(max(result.times[name]))} | {median / sft:.3f} | {seconds_text(limit)} | {median / limit:.3f} |"
        )
    lines += [
        "",
        "| Reference forward alone (no_grad, adapter off) | Rows | Median (s) | Min - max (s) | x SFT step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows_count in (("ref_all", size), ("ref_25", risky)):
        median = result.median(name)
        lines.append(
            f"| `{name}` | {rows_count} | {seconds_text(median)} | {seconds_text(min(result.times[name]))} - "
            f"{seconds_text(max(result.times[name]))} | {median / sft:.3f} |"
        )
    return lines


def memory_table(memory: Mapping[str, Mapping[str, Any]]) -> list[str]:
    sft = memory["sft"]
    sft_working = sft["peak"] - sft["baseline"]
    lines = [
        "| Configuration | Baseline after setup (MiB) | Peak (MiB) | Working set = peak - baseline (MiB) "
        "| Peak x SFT | Working set x SFT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in TRAIN_CONFIGS:
        entry = memory[name]
        working = entry["peak"] - entry["baseline"]
        working_ratio = f"{working / sft_working:.3f}" if sft_working > 0 else "n/a"
        lines.append(
            f"| `{name}` | {mib_text(entry['baseline'])} | {mib_text(entry['peak'])} | {mib_text(working)} "
            f"| {entry['peak'] / sft['peak']:.3f} | {working_ratio} |"
        )
    return lines


def weights_table(weights: WeightBytes) -> list[str]:
    extra = weights.module - weights.bare
    verdict = "yes" if weights.no_second_copy else "**no**"
    return [
        "| Weights (unique parameter storages) | MiB | Bytes |",
        "|---|---:|---:|",
        f"| bare base model, loaded alone | {mib_text(weights.bare)} | {weights.bare} |",
        f"| `SafeFineTuning` module (reference `{weights.reference_strategy}`) | {mib_text(weights.module)} | {weights.module} |",
        f"| module - bare | {mib_text(extra)} | {extra} |",
        f"| LoRA (trainable) parameters | {mib_text(weights.lora)} | {weights.lora} |",
        "",
        f"No second copy of the weights (module - bare == LoRA bytes, no reference module of its own): {verdict}.",
    ]


def render(
    args: argparse.Namespace,
    setup: LoraSetup,
    timings: TimingResult,
    weights: WeightBytes,
    memory: Mapping[str, Mapping[str, Any]] | None,
) -> str:
    lines = [
        "## Adaptive-KL overhead",
        "",
        environment_line(args, setup),
        "",
        "### Step time (training_step + backward + AdamW step)",
        "",
        *timing_table(timings, setup),
        "",
    ]
    if memory is not None:
        lines += [
            f"### Peak memory (fresh process per configuration: set-up, {args.warmup} warm-up + {_MEMORY_STEPS} steps)",
            "",
            *memory_table(memory),
            "",
        ]
    lines += ["### Weights", "", *weights_table(weights), "", "Notes:", ""]
    lines.append(
        "* Limit = median(`sft`) + median of the reference forward on the rows the configuration needs "
        "(none, `ref_all`, `ref_25`); x limit above 1 is the cost of the KL term, the row selection "
        "and the bookkeeping. Reference rows per step were counted during the timed steps."
    )
    lines.append(
        "* All timings in one process and one model; each repetition runs every timing once, in a "
        "rotating order; medians over the repetitions. AdamW steps change the LoRA weights between "
        "repetitions, equally for every configuration."
    )
    if memory is not None:
        measure = memory_measure_note(memory.values())
        ratio = memory["adaptive_all"]["peak"] / memory["sft"]["peak"]
        target = "met" if ratio <= 1.05 else "**not met**"
        lines.append(f"* Memory measure: {measure}.")
        lines.append(f"* Target: peak of `adaptive_all` within 5% of `sft`: {ratio:.3f}, {target}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process(args.cache, args.threads)

    if args.memory_worker is not None:
        print(_RESULT_PREFIX + json.dumps(memory_worker(args)), flush=True)
        return 0

    setup = build_setup(args, pick_device())
    timings = run_timings(args, setup)
    weights = weight_bytes(args, setup)
    memory = run_memory(args) if args.memory else None
    report = render(args, setup, timings, weights, memory)
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)

    mismatched = [n for n in TRAIN_CONFIGS if timings.reference_rows[n] != timings.expected_rows[n]]
    if mismatched:
        print(f"error: the reference ran on unexpected rows for {', '.join(mismatched)}", file=sys.stderr)
        return 1
    if not weights.no_second_copy:
        print("error: the module holds more than the base weights and LoRA", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
