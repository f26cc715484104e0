"""What the step-time benchmarks share (``overhead.py``, ``peers.py``, ``gpu_throughput.py``).

* one LoRA ``SafeFineTuning`` module with AdamW and one fixed, seeded batch of random token ids
  ``[B, T]`` (the first ``prompt_len`` tokens of each row are prompt, label -100), with the three
  training configurations ``sft`` (``ConstantBeta(0)``), ``adaptive_all`` (``LinearRiskSchedule(0.1,
  0.9)``, uniform risk: the reference runs on every row) and ``adaptive_25`` (``ThresholdRiskSchedule
  (0.5, 0, 0.9)`` with a quarter of the rows at risk 1: the reference runs on those rows only);
* interleaved timing: every repetition runs every action once, in a rotating order, so that drift
  of the machine hits all of them alike; medians over the repetitions;
* peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU after the
  weights were paged in and the high-water mark reset (``/proc/self/clear_refs``), measured in a
  fresh worker process per configuration (RSS keeps what an earlier configuration touched).
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TRAIN_CONFIGS = ("sft", "adaptive_all", "adaptive_25")
MiB = 1024 * 1024


# ----------------------------------------------------------------------------------- the process
def prepare_process(cache: str | None = None, threads: int | None = None) -> None:
    """Model cache (inherited by worker processes), torch threads, and quiet logs for a benchmark process."""
    if cache is not None:
        os.environ["LIGHTNING_SAFETY_CACHE"] = str(os.path.expanduser(cache))
    if threads is not None:
        torch.set_num_threads(threads)
    # SafeFineTuning.training_step logs; outside a Trainer, Lightning warns and ignores it.
    warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed checkpointing names
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def add_run_arguments(parser: argparse.ArgumentParser, workers: Sequence[str]) -> None:
    """The options every step-time benchmark with memory workers takes."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="set LIGHTNING_SAFETY_CACHE (default: the library's)")
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory in subprocesses"
    )
    parser.add_argument("--memory-worker", choices=list(workers), default=None, help=argparse.SUPPRESS)


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``) sizes, repeats and thread counts that cannot run."""
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.lora_r < 1:
        parser.error("--batch-size, --repeats and --lora-r must be >= 1, --warmup >= 0")
    if not 0 <= args.prompt_len < args.seq_len - 1:
        parser.error("--prompt-len must leave at least 2 response tokens: 0 <= prompt-len < seq-len - 1")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        parser.error("--threads must be >= 1")


# ----------------------------------------------------------------------------------- devices and timing
def pick_device(name: str | None = None) -> torch.device:
    """``name`` (``cuda``, ``cpu``, ...) or, when None, CUDA where available."""
    if name is not None:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(action: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``action`` takes, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - start


def run_interleaved(
    actions: Mapping[str, Callable[[], None]], *, warmup: int, repeats: int, device: torch.device, tag: str
) -> dict[str, list[float]]:
    """Seconds of each action in every timed repetition (``repeats`` values each).

    Each repetition runs every action once; the order rotates by one per repetition, so that no
    action always runs first (cold caches) or right after the same neighbour.
    """
    names = list(actions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(actions[name], device)
            if round_index >= warmup:
                times[name].append(seconds)
        progress = "warm-up" if round_index < warmup else f"repeat {round_index - warmup + 1}/{repeats}"
        print(f"[{tag}] {progress} done", file=sys.stderr, flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------------- the LoRA module and its batch
def risky_row_count(batch_size: int) -> int:
    """Rows at risk 1 in ``adaptive_25``: a quarter of the batch, at least one."""
    return max(1, round(batch_size / 4))


def token_batch(vocab: int, size: int, length: int, prompt_len: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random token ids ``[size, length]``; labels ``[size, length]`` are the ids, -100 on the first ``prompt_len``."""
    input_ids = torch.randint(0, vocab, (size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@dataclass
class LoraSetup:
    module: Any  # SafeFineTuning (imported lazily: a benchmark may set the model cache first)
    optimizer: torch.optim.Optimizer
    batches: dict[str, dict[str, Tensor]]  # one batch per training configuration, on ``device``
    schedules: dict[str, Any]  # one RiskSchedule per training configuration
    risky_rows: Tensor  # [B/4] rows with risk 1 in ``adaptive_25``
    device: torch.device

    @property
    def vocab(self) -> int:
        return int(self.module.policy.get_output_embeddings().weight.shape[0])


def build_lora_setup(
    model: str | nn.Module,
    *,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    prompt_len: int,
    lora_r: int,
    seed: int,
    dtype: str | None = None,
    chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
) -> LoraSetup:
    """One ``SafeFineTuning`` module (LoRA on all linear layers, dropout 0, reference = the adapter
    switched off, AdamW over the adapter) and the fixed batch with each configuration's risk."""
    from lightning_safety.schedules import ConstantBeta, LinearRiskSchedule, ThresholdRiskSchedule
    from lightning_safety.models import LoraSettings
    from lightning_safety.module import SafeFineTuning

    torch.manual_seed(seed)  # LoRA initialisation
    module = SafeFineTuning(
        model,
        dtype=dtype,
        lora=LoraSettings(r=lora_r, dropout=0.0),
        reference="adapter_disabled",
        chunk_size=chunk_size,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=torch.optim.AdamW,
    )
    optimizer = ready_module(module, device)
    generator = torch.Generator().manual_seed(seed)
    vocab = int(module.policy.get_output_embeddings().weight.shape[0])
    base = token_batch(vocab, batch_size, seq_len, prompt_len, generator)
    risky_rows = torch.randperm(batch_size, generator=generator)[: risky_row_count(batch_size)].sort().values
    quarter_risk = torch.zeros(batch_size)
    quarter_risk[risky_rows] = 1.0
    risks = {
        "sft": None,  # plain SFT: ConstantBeta needs no risk column
        "adaptive_all": torch.rand(batch_size, generator=generator),
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
    return LoraSetup(module, optimizer, batches, schedules, risky_rows.to(device), device)


def ready_module(module: Any, device: torch.device) -> torch.optim.Optimizer:
    """Build a ``SafeFineTuning`` module's models on ``device`` in training mode; its optimizer (no Trainer)."""
    module.configure_model()
    module.to(device)
    module.train()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer), "the benchmarks step one plain optimizer"
    return optimizer


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """backward -> optimizer step -> zero_grad: the part of a training step every configuration shares."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(setup: LoraSetup, config: str) -> None:
    """training_step -> backward -> optimizer step, with ``config``'s schedule and risk."""
    setup.module.schedule = setup.schedules[config]
    optimizer_step(setup.module.training_step(setup.batches[config], 0)["loss"], setup.optimizer)


@contextmanager
def counting_reference_rows() -> Iterator[list[int]]:
    """Record the batch size of every reference forward that ``SafeFineTuning`` makes."""
    import lightning_safety.reference as reference_lib

    rows: list[int] = []
    original = reference_lib.Reference.logits

    def counting(self: Any, input_ids: Tensor, attention_mask: Tensor | None, logits_to_keep: int = 0) -> Any:
        rows.append(int(input_ids.shape[0]))
        return original(self, input_ids, attention_mask, logits_to_keep)

    reference_lib.Reference.logits = counting
    try:
        yield rows
    finally:
        reference_lib.Reference.logits = original


def unique_storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or shared weights count once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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
def _page_in(modules: Iterable[nn.Module]) -> None:
    """Read every weight once: safetensors weights are memory-mapped and become resident (and
    count in RSS) only when first touched, which would otherwise land in the first step."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.sum()


def memory_baseline(device: torch.device, modules: Iterable[nn.Module]) -> tuple[int, bool]:
    """Start a peak measurement once set up: (bytes in use now, whether the peak could be reset).

    CUDA: ``memory_allocated`` after ``reset_peak_memory_stats``. CPU: RSS after every weight of
    ``modules`` was read once and the RSS high-water mark was reset to it.
    """
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), True
    _page_in(modules)
    gc.collect()
    reset = _reset_rss_high_water_mark()
    return _status_bytes("VmRSS") or 0, reset


def memory_peak(device: torch.device) -> tuple[int, str]:
    """The peak since :func:`memory_baseline` and where it was read."""
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    return _peak_rss_bytes()


def measure_peak(device: torch.device, modules: Iterable[nn.Module], step: Callable[[], None], steps: int) -> dict[str, Any]:
    """Baseline once set up and peak over ``steps`` calls of ``step`` (a memory worker's measurement)."""
    baseline, reset = memory_baseline(device, modules)
    for _ in range(steps):
        step()
    peak, source = memory_peak(device)
    return {"device": device.type, "baseline": baseline, "peak": peak, "peak_source": source, "peak_reset": reset,
            "steps": steps}


def run_memory_worker(argv: list[str], prefix: str, tag: str) -> dict[str, Any]:
    """Run ``argv`` (a benchmark re-run as a memory worker) and return the JSON it printed after ``prefix``."""
    # glibc serves allocations below its (adaptive, up to 32 MiB) mmap threshold from the heap
    # and keeps freed heap pages, so RSS would also count memory that is free again. A fixed
    # 64 KiB threshold sends every tensor-sized block to mmap: RSS then follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"memory worker '{tag}' failed (exit code {done.returncode})")
    return json.loads(lines[-1][len(prefix) :])


def memory_measure_note(entries: Iterable[Mapping[str, Any]]) -> str:
    """How the peaks in ``entries`` (memory worker results) were measured, in one sentence."""
    entries = list(entries)
    if entries and entries[0]["device"] == "cuda":
        return (
            "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` once set up; baseline "
            "= `torch.cuda.memory_allocated` then (weights, optimizer, batch)"
        )
    if all(entry["peak_reset"] and entry["peak_source"] == "VmHWM" for entry in entries):
        return (
            "process peak RSS (`VmHWM` in /proc/self/status, the high-water mark `getrusage().ru_maxrss` "
            "reports) after every weight was read once (the safetensors weights are memory-mapped and "
            "only become resident when touched) and the mark was reset to the RSS then "
            "(`/proc/self/clear_refs`), so model loading does not count; baseline = RSS then (`VmRSS`: "
            "weights, batch; AdamW state is created in the first step). The workers run with "
            f"`MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '65536')}`, so that freed "
            "tensor memory leaves the process and RSS follows live memory; differences of a few MiB are noise"
        )
    return (
        "process peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) **including model loading** (the "
        "high-water mark could not be reset); baseline = RSS once set up"
    )


# ----------------------------------------------------------------------------------- report
def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a markdown table; ``align`` has one letter per column: ``l`` left, ``r`` right."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def seconds_text(value: float) -> str:
    return f"{value:.4f}" if value < 10 else f"{value:.2f}"


def mib_text(value: float) -> str:
    return f"{value / MiB:.1f}"


def environment_text(device: torch.device, packages: Sequence[str] = ("transformers", "peft")) -> str:
    """Device, torch threads, package versions, Python and the date, for a table's header line."""
    import importlib.metadata

    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"device {where}, torch threads {torch.get_num_threads()}; torch {torch.__version__}, {versions}, "
        f"python {platform.python_version()}; {date}"
    )
