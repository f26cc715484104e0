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

Also timed alone: the reference forward (``reference_logits("adapter_disabled", ...)``, no
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
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

TRAIN_CONFIGS = ("sft", "adaptive_all", "adaptive_25")
_RESULT_PREFIX = "OVERHEAD_MEMORY_RESULT "
_MEMORY_STEPS = 2
_MiB = 1024 * 1024


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
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="set LIGHTNING_SAFETY_CACHE (default: the library's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory in subprocesses"
    )
    parser.add_argument("--memory-worker", choices=TRAIN_CONFIGS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.lora_r < 1:
        parser.error("--batch-size, --repeats and --lora-r must be >= 1, --warmup >= 0")
    if not 0 <= args.prompt_len < args.seq_len - 1:
        parser.error("--prompt-len must leave at least 2 response tokens: 0 <= prompt-len < seq-len - 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
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
def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Setup:
    module: Any  # SafeFineTuning (imported lazily, after --cache is applied)
    optimizer: torch.optim.Optimizer
    batches: dict[str, dict[str, Tensor]]  # one batch per training configuration
    schedules: dict[str, Any]  # one RiskSchedule per training configuration
    risky_rows: Tensor  # [B/4] rows with risk 1 in ``adaptive_25``
    device: torch.device


def build_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    """One LoRA module with AdamW, and the fixed batch with each configuration's risk."""
    from lightning_safety.losses import ConstantBeta, LinearRiskSchedule, ThresholdRiskSchedule
    from lightning_safety.models import LoraSettings
    from lightning_safety.module import SafeFineTuning

    torch.manual_seed(args.seed)  # LoRA initialisation
    module = SafeFineTuning(
        args.model,
        dtype=args.dtype,
        lora=LoraSettings(r=args.lora_r, dropout=0.0),
        reference="adapter_disabled",
        chunk_size=args.chunk_size,
        optimizer=torch.optim.AdamW,
    )
    module.configure_model()
    module.to(device)
    module.train()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)

    size, length = args.batch_size, args.seq_len
    generator = torch.Generator().manual_seed(args.seed)
    vocab = int(module.policy.get_output_embeddings().weight.shape[0])
    input_ids = torch.randint(0, vocab, (size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.prompt_len] = -100
    base = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    risky = risky_row_count(size)
    risky_rows = torch.randperm(size, generator=generator)[:risky].sort().values
    quarter_risk = torch.zeros(size)
    quarter_risk[risky_rows] = 1.0
    risks = {
        "sft": None,  # plain SFT: ConstantBeta needs no risk column
        "adaptive_all": torch.rand(size, generator=generator),
        "adaptive_25": quarter_risk,
    }
    batches = {}
    for name, risk in risks.items():
        batch = dict(base) if risk is None else {**base, "risk": risk}
        batches[name] = {key: value.to(device) for key, value in batch.items()}
    schedules = {
        "sft": ConstantBeta(0.0),
        "adaptive_all": LinearRiskSchedule(0.1, 0.9),
        "adaptive_25": ThresholdRiskSchedule(threshold=0.5, beta_low=0.0, beta_high=0.9),
    }
    return Setup(module, optimizer, batches, schedules, risky_rows.to(device), device)


def risky_row_count(batch_size: int) -> int:
    """Rows at risk 1 in ``adaptive_25``: a quarter of the batch, at least one."""
    return max(1, round(batch_size / 4))


def _expected_rows_per_step(args: argparse.Namespace, config: str) -> int:
    return {"sft": 0, "adaptive_all": args.batch_size, "adaptive_25": risky_row_count(args.batch_size)}[config]


# ----------------------------------------------------------------------------------- one step
def train_step(setup: Setup, config: str) -> None:
    """training_step -> backward -> optimizer step, with ``config``'s schedule and risk."""
    setup.module.schedule = setup.schedules[config]
    loss = setup.module.training_step(setup.batches[config], 0)["loss"]
    loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def reference_forward(setup: Setup, rows: Tensor | None) -> None:
    """The frozen reference's forward alone (no_grad, adapter off), on all rows or ``rows``."""
    from lightning_safety.losses import ProjectedLogits
    from lightning_safety.models import reference_logits

    batch = setup.batches["sft"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if rows is not None:  # the same row selection compute_loss does
        input_ids, attention_mask = input_ids[rows], attention_mask[rows]
    module = setup.module
    keep = module._logits_to_keep(batch["labels"])  # the same output-layer positions the step uses
    logits = reference_logits(
        module.reference_strategy,
        module.policy,
        module.reference,
        input_ids,
        attention_mask,
        logits_to_keep=keep,
        projection=module._reference_projection(input_ids),
    )
    if isinstance(logits, ProjectedLogits):  # the step projects per chunk; the cost is the same
        logits.materialize()


def timing_actions(setup: Setup) -> dict[str, Callable[[], None]]:
    return {
        "sft": lambda: train_step(setup, "sft"),
        "adaptive_all": lambda: train_step(setup, "adaptive_all"),
        "adaptive_25": lambda: train_step(setup, "adaptive_25"),
        "ref_all": lambda: reference_forward(setup, None),
        "ref_25": lambda: reference_forward(setup, setup.risky_rows),
    }


@contextmanager
def counting_reference_rows() -> Iterator[list[int]]:
    """Record the batch size of every reference forward that ``SafeFineTuning`` makes."""
    import lightning_safety.module as module_lib

    rows: list[int] = []
    original = module_lib.reference_logits

    def counting(strategy: str, policy: nn.Module, reference: nn.Module | None, input_ids: Tensor, attention_mask: Tensor | None, **kwargs) -> Tensor:
        rows.append(int(input_ids.shape[0]))
        return original(strategy, policy, reference, input_ids, attention_mask, **kwargs)

    module_lib.reference_logits = counting
    try:
        yield rows
    finally:
        module_lib.reference_logits = original


def timed(action: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- timings
@dataclass
class TimingResult:
    times: dict[str, list[float]]  # timed repetitions per configuration
    reference_rows: dict[str, float]  # mean reference rows per step, counted
    expected_rows: dict[str, int]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


def run_timings(args: argparse.Namespace, setup: Setup) -> TimingResult:
    actions = timing_actions(setup)
    names = list(actions)
    times: dict[str, list[float]] = {name: [] for name in names}
    counted: dict[str, list[int]] = {name: [] for name in TRAIN_CONFIGS}
    with counting_reference_rows() as rows:
        for round_index in range(args.warmup + args.repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:  # rotating order
                before = len(rows)
                seconds = timed(actions[name], setup.device)
                if name in counted:
                    counted[name].append(sum(rows[before:]))
                if round_index >= args.warmup:
                    times[name].append(seconds)
            progress = "warm-up" if round_index < args.warmup else f"repeat {round_index - args.warmup + 1}/{args.repeats}"
            print(f"[overhead] {progress} done", file=sys.stderr, flush=True)
    return TimingResult(
        times=times,
        reference_rows={name: statistics.fmean(values) for name, values in counted.items()},
        expected_rows={name: _expected_rows_per_step(args, name) for name in TRAIN_CONFIGS},
    )


# ----------------------------------------------------------------------------------- weights
def unique_storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or shared weights count once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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


def weight_bytes(args: argparse.Namespace, setup: Setup) -> WeightBytes:
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
def _reset_rss_high_water_mark() -> bool:
    """Set the process's peak RSS to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> tuple[int, str]:
    """The process's peak RSS and where it was read.

    ``VmHWM`` is the address space's high-water mark, the value ``ru_maxrss`` reports for a live
    process, and the one ``clear_refs`` resets; ``ru_maxrss`` itself also keeps the mark of
    threads that exited earlier (e.g. a weight-loading thread pool), so it is only the fallback.
    """
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (maxrss * 1024 if sys.platform.startswith("linux") else maxrss), "ru_maxrss"  # KiB on Linux


@torch.no_grad()
def _page_in(module: nn.Module) -> None:
    """Read every weight once: safetensors weights are memory-mapped and become resident (and
    count in RSS) only when first touched, which would otherwise land in the first step."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.sum()


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: set up, reset the peak, warm up, run 2 steps; baseline and peak in bytes."""
    device = pick_device()
    setup = build_setup(args, device)
    config = args.memory_worker
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        reset = True
    else:
        _page_in(setup.module)
        gc.collect()
        reset = _reset_rss_high_water_mark()
        baseline = _status_bytes("VmRSS") or 0
    with counting_reference_rows() as rows:
        for _ in range(args.warmup + _MEMORY_STEPS):
            train_step(setup, config)
    synchronize(device)
    if device.type == "cuda":
        peak, source = torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    else:
        peak, source = _peak_rss_bytes()
    return {
        "config": config,
        "device": device.type,
        "baseline": baseline,
        "peak": peak,
        "peak_source": source,
        "peak_reset": reset,
        "steps": args.warmup + _MEMORY_STEPS,
        "reference_rows": sum(rows),
    }


def run_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for config in TRAIN_CONFIGS:
        print(f"[overhead] memory: {config} in a fresh process", file=sys.stderr, flush=True)
        # glibc serves allocations below its (adaptive, up to 32 MiB) mmap threshold from the heap
        # and keeps freed heap pages, so RSS would also count memory that is free again. A fixed
        # 64 KiB threshold sends every tensor-sized block to mmap: RSS then follows live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
        done = subprocess.run(worker_argv(args, config), capture_output=True, text=True, check=False, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr[-4000:])
            raise RuntimeError(f"memory worker '{config}' failed (exit code {done.returncode})")
        result = json.loads(lines[-1][len(_RESULT_PREFIX) :])
        expected = _expected_rows_per_step(args, config) * result["steps"]
        if result["reference_rows"] != expected:
            raise RuntimeError(
                f"memory worker '{config}': the reference ran on {result['reference_rows']} rows, expected {expected}"
            )
        results[config] = result
    return results


# ----------------------------------------------------------------------------------- report
def _seconds(value: float) -> str:
    return f"{value:.4f}" if value < 10 else f"{value:.2f}"


def _mib(value: float) -> str:
    return f"{value / _MiB:.1f}"


def environment_line(args: argparse.Namespace, setup: Setup) -> str:
    import peft
    import transformers

    device = setup.device
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dtype = next(setup.module.policy.parameters()).dtype
    return (
        f"model `{args.model}` ({str(dtype).removeprefix('torch.')}), B x T = {args.batch_size} x {args.seq_len} "
        f"({args.seq_len - args.prompt_len} response tokens per row), LoRA r={args.lora_r} all-linear, "
        f"chunk_size={args.chunk_size}; device {where}, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"python {platform.python_version()}; {date}; {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up round(s)"
    )


def timing_table(result: TimingResult, setup: Setup) -> list[str]:
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
            f"| `{name}`: {labels[name]} | {rows} | {_seconds(median)} | {_seconds(min(result.times[name]))} - "
            f"{_seconds(max(result.times[name]))} | {median / sft:.3f} | {_seconds(limit)} | {median / limit:.3f} |"
        )
    lines += [
        "",
        "| Reference forward alone (no_grad, adapter off) | Rows | Median (s) | Min - max (s) | x SFT step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows_count in (("ref_all", size), ("ref_25", risky)):
        median = result.median(name)
        lines.append(
            f"| `{name}` | {rows_count} | {_seconds(median)} | {_seconds(min(result.times[name]))} - "
            f"{_seconds(max(result.times[name]))} | {median / sft:.3f} |"
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
            f"| `{name}` | {_mib(entry['baseline'])} | {_mib(entry['peak'])} | {_mib(working)} "
            f"| {entry['peak'] / sft['peak']:.3f} | {working_ratio} |"
        )
    return lines


def weights_table(weights: WeightBytes) -> list[str]:
    extra = weights.module - weights.bare
    verdict = "yes" if weights.no_second_copy else "**no**"
    return [
        "| Weights (unique parameter storages) | MiB | Bytes |",
        "|---|---:|---:|",
        f"| bare base model, loaded alone | {_mib(weights.bare)} | {weights.bare} |",
        f"| `SafeFineTuning` module (reference `{weights.reference_strategy}`) | {_mib(weights.module)} | {weights.module} |",
        f"| module - bare | {_mib(extra)} | {extra} |",
        f"| LoRA (trainable) parameters | {_mib(weights.lora)} | {weights.lora} |",
        "",
        f"No second copy of the weights (module - bare == LoRA bytes, no reference module of its own): {verdict}.",
    ]


def render(
    args: argparse.Namespace,
    setup: Setup,
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
        device = memory["sft"]["device"]
        if device == "cuda":
            measure = (
                "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` once set up; baseline "
                "= `torch.cuda.memory_allocated` then (weights, optimizer, batch)"
            )
        elif all(entry["peak_reset"] and entry["peak_source"] == "VmHWM" for entry in memory.values()):
            measure = (
                "process peak RSS (`VmHWM` in /proc/self/status, the high-water mark `getrusage().ru_maxrss` "
                "reports) after every weight was read once (the safetensors weights are memory-mapped and "
                "only become resident when touched) and the mark was reset to the RSS then "
                "(`/proc/self/clear_refs`), so model loading does not count; baseline = RSS then (`VmRSS`: "
                "weights, batch; AdamW state is created in the first step). The workers run with "
                f"`MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '65536')}`, so that freed "
                "tensor memory leaves the process and RSS follows live memory; differences of a few MiB are noise"
            )
        else:
            measure = (
                "process peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) **including model loading** (the "
                "high-water mark could not be reset); baseline = RSS once set up"
            )
        ratio = memory["adaptive_all"]["peak"] / memory["sft"]["peak"]
        target = "met" if ratio <= 1.05 else "**not met**"
        lines.append(f"* Memory measure: {measure}.")
        lines.append(f"* Target: peak of `adaptive_all` within 5% of `sft`: {ratio:.3f}, {target}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cache is not None:
        os.environ["LIGHTNING_SAFETY_CACHE"] = str(Path(args.cache).expanduser())  # workers inherit it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # SafeFineTuning.training_step logs; outside a Trainer, Lightning warns and ignores it.
    warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

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
