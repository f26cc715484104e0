#!/usr/bin/env python
"""Tokens/s, MFU and peak memory of LoRA SFT vs adaptive KL on a Llama-3-8B-shaped model (the GPU check).

Two modes:

``--mode throughput`` (default): one LoRA ``SafeFineTuning`` module (reference = the adapter switched
off) on a model with random weights built from a config, no hub:
``LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
num_key_value_heads=8, vocab_size=128256)`` in bf16 (``--layers`` builds fewer decoder layers). The
configurations and their fixed, seeded batch of random token ids ``[B, T]`` are ``overhead.py``'s
(``steptime.py``): ``sft`` (``ConstantBeta(0)``), ``adaptive_all`` (``LinearRiskSchedule(0.1, 0.9)``,
the reference on every row) and ``adaptive_25`` (a quarter of the rows risky, the reference on those
only); timed interleaved in one process, medians. The module is cast to the weights' dtype, as
Lightning's ``bf16-true`` precision does (PEFT keeps adapters in float32 otherwise). Defaults follow
``configs/llama3_8b_lora_adaptive.yaml``: LoRA r=64 on all linear layers, gradient checkpointing,
``chunk_size=256``; B x T = 8 x 1024, the second half of each row response.

``--mode fsdp2``: a short ``Trainer.fit`` with ``ModelParallelStrategy(data_parallel_size=1,
tensor_parallel_size=1)`` (FSDP2 on one device, as ``tests/fsdp_worker.py`` runs it on two CPU
processes): full fine-tuning, the reference a frozen copy (``model_copy``) that
``SafeFineTuning.configure_model`` shards like the policy, bf16 weights (``bf16-true``), gradients
reduced in float32, adaptive KL on every row; as ``configs/llama3_8b_full_fsdp2.yaml`` but on one
device, with 8 decoder layers by default (full fine-tuning keeps weights, reference, gradients and
two AdamW states: ~5 x 2 bytes per parameter, 80 GB at 32 layers before activations). It checks
that the policy and the reference are sharded, and that the reference ran on every row.

Measures:

* tokens/s = B x T / median step time (every position of every row, prompt included);
* MFU = 6 x N x tokens/s / peak FLOP/s, N = the model's parameters without the input embedding
  table (a lookup, not a matmul). 6 N per token is a full fine-tuning step's model FLOPs (forward
  2 N, backward 4 N); a LoRA step does about 4 N (no weight gradients of the base) and recomputation
  under gradient checkpointing is not counted, so for LoRA this MFU is "useful work at the rate of a
  full fine-tuning step" and compares configurations on the same scale: the reference forward of
  adaptive KL (2 N per row that needs it) shows as a lower MFU. Peak FLOP/s: dense bf16 tensor-core
  FLOP/s per GPU from ``PEAK_TFLOPS`` by device name, or ``--peak-tflops`` (required on CPU for MFU);
* peak memory: ``torch.cuda.max_memory_allocated`` (CUDA only; reset before each configuration's
  measured steps, in this process: the allocator statistic counts live tensors only).

Reproduce
---------
::

    python benchmarks/gpu_throughput.py --out-dir gpu_check_out                 # one H100/H200, ~1-2 minutes
    python benchmarks/gpu_throughput.py --mode fsdp2 --out-dir gpu_check_out    # ~1 minute
    python benchmarks/gpu_throughput.py --quick --device cpu --peak-tflops 1    # tiny model on CPU: plumbing only

``benchmarks/gpu_check.sh`` runs both after installing the package and the ``gpu`` tests.
Outputs with ``--out-dir``: ``throughput.md`` / ``throughput.json`` or ``fsdp2.md`` / ``fsdp2.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from steptime import (TRAIN_CONFIGS, LoraSetup, build_lora_setup, check_run_arguments, counting_reference_rows,
                      environment_text, markdown_table, memory_baseline, memory_peak, mib_text, pick_device,
                      prepare_process, risky_row_count, run_interleaved, seconds_text, synchronize, token_batch,
                      train_step)

LLAMA3_8B_SHAPE = "llama3-8b-shape"
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256}
# Dense bf16/fp16 tensor-core peak per GPU (NVIDIA data sheets; with sparsity it is twice this).
# First match wins: more specific names first.
PEAK_TFLOPS = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.05),
)
_DEFAULTS = {
    "throughput": {"batch_size": 8, "seq_len": 1024, "layers": 32, "repeats": 5, "warmup": 2},
    "fsdp2": {"batch_size": 4, "seq_len": 512, "layers": 8, "repeats": 5, "warmup": 2},
    "quick": {"batch_size": 4, "seq_len": 32, "layers": 0, "repeats": 2, "warmup": 1},
}


# ----------------------------------------------------------------------------------- arguments
CONFIGS = (*TRAIN_CONFIGS, "cached_all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokens/s, MFU and peak memory of LoRA SFT vs adaptive KL (or an FSDP2 run) on an 8B-shaped model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mode", choices=("throughput", "fsdp2"), default="throughput")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 x 32 tokens, 2 repeats: plumbing only")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--model", default=None,
                        help=f"'{LLAMA3_8B_SHAPE}' (random weights from the config) or a model alias/folder "
                             "(default: the 8B shape; --quick: tiny-random-llama)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the 8B shape (default 32; fsdp2: 8)")
    parser.add_argument("--dtype", default=None, help="weights dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (fsdp2: 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024 (fsdp2: 512)")
    parser.add_argument("--prompt-len", type=int, default=None, help="leading tokens per row with label -100 (default T/2)")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--cache-top-k", type=int, default=64, help="k of the reference cache (cached_all)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps of every configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device (overrides the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="write <mode>.md and <mode>.json here")
    args = parser.parse_args(argv)
    defaults = _DEFAULTS["quick" if args.quick else args.mode]
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.model is None:
        args.model = "tiny-random-llama" if args.quick else LLAMA3_8B_SHAPE
    if args.prompt_len is None:
        args.prompt_len = args.seq_len // 2
    check_run_arguments(parser, args)
    if args.model == LLAMA3_8B_SHAPE and args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be > 0")
    return args


# ----------------------------------------------------------------------------------- model and FLOPs
def resolve_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    from lightning_safety.models import resolve_dtype as library_dtype

    return library_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The causal LM: random weights in the 8B shape, built on ``device`` (no hub), or a named model."""
    if args.model != LLAMA3_8B_SHAPE:
        from lightning_safety.models import load_causal_lm

        return load_causal_lm(args.model, dtype=dtype).to(device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers})
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs: no 16 GB detour through host memory
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def flop_parameters(model: nn.Module) -> int:
    """N of 6 N per token: every parameter of the base model but the input embedding table."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    output = base.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    total = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    # A tied output layer is the embedding table used as a matmul: then it counts once.
    return total if tied else total - embedding.numel()


def table_peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 TFLOP/s) of the first ``PEAK_TFLOPS`` entry in ``device_name``; None if none."""
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return key, tflops
    return None


def peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    """Peak FLOP/s per device and where it came from (None when unknown: no MFU)."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown on CPU: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    found = table_peak_tflops(name)
    if found is None:
        return None, f"'{name}' not in the table: pass --peak-tflops"
    return found[1] * 1e12, f"table: {found[0]} (dense bf16)"


def rates(step_seconds: float, tokens: int, params: int, peak: float | None) -> dict[str, float | None]:
    """tokens/s and MFU (6 N tokens/s / peak) of one median step."""
    per_second = tokens / step_seconds
    return {"tokens_per_s": per_second, "mfu": None if peak is None else 6 * params * per_second / peak}


# ----------------------------------------------------------------------------------- throughput
def run_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = resolve_dtype(args, device)
    model = build_model(args, device, dtype)
    setup = build_lora_setup(
        model, device=device, batch_size=args.batch_size, seq_len=args.seq_len, prompt_len=args.prompt_len,
        lora_r=args.lora_r, seed=args.seed, chunk_size=args.chunk_size,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    setup.module.to(dtype)  # as bf16-true precision: the adapters too (same Parameter objects: AdamW keeps them)
    params = flop_parameters(setup.module.policy)
    peak, peak_source = peak_flops(args, device)
    tokens = args.batch_size * args.seq_len
    expected = {"sft": 0, "adaptive_all": args.batch_size, "adaptive_25": risky_row_count(args.batch_size), "cached_all": 0}
    with tempfile.TemporaryDirectory(prefix="gpu-reference-cache-") as folder:
        cache = reference_cache_of(setup, Path(folder) / "cache", args.cache_top_k)
        with counting_reference_rows() as rows:
            actions = {name: (lambda name=name: train_step(setup, name)) for name in TRAIN_CONFIGS}
            actions["cached_all"] = lambda: cached_step(setup, cache)
            times = run_interleaved(actions, warmup=args.warmup, repeats=args.repeats, device=device, tag="throughput")
            memory = measure_memory(setup, cache) if device.type == "cuda" else None
            counted = list(rows)
    steps = args.warmup + args.repeats + (1 if memory is not None else 0)
    configs = {}
    for name in CONFIGS:
        median = statistics.median(times[name])
        configs[name] = {"times": times[name], "median": median, **rates(median, tokens, params, peak),
                         "peak_memory": None if memory is None else memory[name]["peak"],
                         "expected_reference_rows": expected[name]}
    total_expected = steps * sum(expected.values())
    return {
        "mode": "throughput",
        "model": describe_model(args, setup.module.policy, dtype),
        "environment": environment_text(device),
        "settings": settings_of(args),
        "flop_parameters": params,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "tokens_per_step": tokens,
        "configs": configs,
        "memory_baseline": None if memory is None else memory["sft"]["baseline"],
        "reference_rows_counted": sum(counted),
        "reference_rows_expected": total_expected,
        "ok": sum(counted) == total_expected and all(math.isfinite(c["median"]) for c in configs.values()),
    }


def reference_cache_of(setup: LoraSetup, folder: Path, top_k: int) -> Any:
    """The reference's top-k output for the setup's batch (its rows get ids), written and opened."""
    ids = [f"row-{i}" for i in range(setup.batches["sft"]["input_ids"].shape[0])]
    for batch in setup.batches.values():
        batch["id"] = ids
    return setup.module.precompute_reference([setup.batches["sft"]], str(folder), top_k=top_k)


def cached_step(setup: LoraSetup, cache: Any) -> None:
    """``adaptive_all`` with the reference read from the cache instead of run (a later epoch)."""
    setup.module.use_reference_cache(cache)
    try:
        train_step(setup, "adaptive_all")
    finally:
        setup.module.use_reference_cache(None)


def measure_memory(setup: LoraSetup, cache: Any) -> dict[str, dict[str, int]]:
    """Per configuration: allocated bytes once set up, and the peak of one step (CUDA)."""
    found = {}
    for name in CONFIGS:
        baseline, _ = memory_baseline(setup.device, [setup.module])
        cached_step(setup, cache) if name == "cached_all" else train_step(setup, name)
        peak, _ = memory_peak(setup.device)
        found[name] = {"baseline": baseline, "peak": peak}
    return found


def count_text(count: int) -> str:
    """A parameter count in B or M."""
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.3f} M"


def describe_model(args: argparse.Namespace, model: nn.Module, dtype: torch.dtype) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.config.num_hidden_layers
    total = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    name = f"Llama-3-8B shape, random weights, {layers} decoder layers" if args.model == LLAMA3_8B_SHAPE else f"`{args.model}`"
    return f"{name} ({count_text(total)} parameters, {str(dtype).removeprefix('torch.')})"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("mode", "quick", "model", "layers", "batch_size", "seq_len", "prompt_len",
                                                   "lora_r", "chunk_size", "gradient_checkpointing", "repeats", "warmup",
                                                   "seed")}


# ----------------------------------------------------------------------------------- FSDP2
def run_fsdp2(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Full fine-tuning with adaptive KL under ModelParallelStrategy on one device; the reference sharded."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_safety.distributed import ShardingSettings, is_sharded
    from lightning_safety.schedules import LinearRiskSchedule
    from lightning_safety.module import SafeFineTuning

    dtype = resolve_dtype(args, device)
    model = build_model(args, device, dtype)
    params = flop_parameters(model)
    describe = describe_model(args, model, dtype)
    module = SafeFineTuning(
        model,
        reference="model_copy",
        gradient_checkpointing=args.gradient_checkpointing,
        chunk_size=args.chunk_size,
        normalization="example",
        schedule=LinearRiskSchedule(0.1, 0.9),
        sharding=ShardingSettings(reduce_dtype="float32"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5),
    )
    generator = torch.Generator().manual_seed(args.seed)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    batch = token_batch(vocab, args.batch_size, args.seq_len, args.prompt_len, generator)
    batch["risk"] = torch.rand(args.batch_size, generator=generator)  # beta in [0.1, 0.9]: every row regularized
    steps = args.warmup + args.repeats
    timer = StepTimer(args.warmup)
    precision = "bf16-true" if dtype == torch.bfloat16 else "32-true"
    trainer = L.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu", devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        precision=precision, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[timer],
    )
    try:
        with counting_reference_rows() as rows:
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    finally:
        # Left to interpreter shutdown, a process group can abort the process (gloo) or warn (NCCL).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    median = statistics.median(timer.times)
    peak, peak_source = peak_flops(args, device)
    tokens = args.batch_size * args.seq_len
    sharded = {"policy": is_sharded(module.policy), "reference": is_sharded(module.reference)}
    result = {
        "mode": "fsdp2",
        "model": describe,
        "environment": environment_text(device),
        "settings": settings_of(args),
        "precision": precision,
        "flop_parameters": params,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "tokens_per_step": tokens,
        "steps": len(timer.times) + args.warmup,
        "times": timer.times,
        "median": median,
        **rates(median, tokens, params, peak),
        "losses": timer.losses,
        "peak_memory": timer.peak_memory,
        "sharded": sharded,
        "reference_rows_counted": sum(rows),
        "reference_rows_expected": steps * args.batch_size,
    }
    result["ok"] = (all(sharded.values()) and sum(rows) == steps * args.batch_size
                    and all(math.isfinite(loss) for loss in timer.losses))
    return result


class StepTimer(L.Callback):
    """Seconds of every training batch after the warm-up, every loss, and the peak memory (CUDA)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.losses: list[float] = []
        self.peak_memory: int | None = None
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":  # sharded, on the device, optimizer built: the steps only from here
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        synchronize(pl_module.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_memory = torch.cuda.max_memory_allocated(pl_module.device)


# ----------------------------------------------------------------------------------- report
def _mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _memory(value: int | None) -> str:
    return "n/a" if value is None else mib_text(value)


def render(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    head = (
        f"{result['model']}; B x T = {s['batch_size']} x {s['seq_len']} ({s['seq_len'] - s['prompt_len']} response "
        f"tokens per row), gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"chunk_size={s['chunk_size']}; {result['environment']}; MFU peak: "
        + ("n/a" if result["peak_flops"] is None else f"{result['peak_flops'] / 1e12:g} TFLOP/s")
        + f" ({result['peak_flops_source']}); N = {count_text(result['flop_parameters'])}"
    )
    check = f"Check: {'passed' if result['ok'] else '**FAILED**'}."
    if result["mode"] == "fsdp2":
        title = "## FSDP2 on one device: full fine-tuning, adaptive KL, reference sharded"
        head += f"; precision {result['precision']}"
        header = ["Median step (s)", "Tokens/s", "MFU", "Peak memory (MiB)", "Policy sharded", "Reference sharded",
                  "Reference rows (counted / expected)", "Losses finite"]
        rows = [[seconds_text(result["median"]), f"{result['tokens_per_s']:.0f}", _mfu(result["mfu"]),
                 _memory(result["peak_memory"]), str(result["sharded"]["policy"]), str(result["sharded"]["reference"]),
                 f"{result['reference_rows_counted']} / {result['reference_rows_expected']}",
                 str(all(math.isfinite(x) for x in result["losses"]))]]
        table, notes = markdown_table(header, "rrrrllrl", rows), [check]
    else:
        title = "## Throughput: LoRA SFT vs adaptive KL"
        head += f"; LoRA r={s['lora_r']} all-linear; {s['repeats']} interleaved repeats after {s['warmup']} warm-up round(s)"
        configs = result["configs"]
        sft = configs["sft"]["median"]
        labels = {
            "sft": "plain LoRA SFT: `ConstantBeta(0)`",
            "adaptive_all": "adaptive KL, all rows: `LinearRiskSchedule(0.1, 0.9)`",
            "adaptive_25": "adaptive KL, 25% rows risky: `ThresholdRiskSchedule(0.5, 0, 0.9)`",
            "cached_all": "adaptive KL, all rows, reference from the cache (`use_reference_cache`, a later epoch)",
        }
        header = ["Configuration", "Reference rows / step", "Median step (s)", "Tokens/s", "x SFT tokens/s", "MFU",
                  "Peak memory (MiB)"]
        rows = [[f"`{name}`: {labels[name]}", str(entry["expected_reference_rows"]), seconds_text(entry["median"]),
                 f"{entry['tokens_per_s']:.0f}", f"{sft / entry['median']:.3f}", _mfu(entry["mfu"]),
                 _memory(entry["peak_memory"])]
                for name, entry in ((name, configs[name]) for name in CONFIGS)]
        table = markdown_table(header, "lrrrrrr", rows)
        notes = [f"Reference rows counted over all steps: {result['reference_rows_counted']} (expected "
                 f"{result['reference_rows_expected']}). {check}"]
        if result["memory_baseline"] is not None:
            notes.append(f"Allocated once set up (weights, adapter, AdamW state, batch): "
                         f"{mib_text(result['memory_baseline'])} MiB.")
    return "\n".join([title, "", head, "", *table, "", *notes]) + "\n"


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs (if asked) use the tensor cores as bf16 ones do
    result = run_fsdp2(args, device) if args.mode == "fsdp2" else run_throughput(args, device)
    report = render(result)
    print(report, end="")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.mode}.md").write_text(report)
        (args.out_dir / f"{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not result["ok"]:
        print(f"error: the {args.mode} check failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
