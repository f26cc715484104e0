#!/usr/bin/env python
"""The reference cache and the fused output layer: step time, memory, KL error, a 20-epoch run.

What is measured (one process, except the memory workers)
----------------------------------------------------------
1. **Step time** of one ``SafeFineTuning`` LoRA module (reference = the adapter switched off) on
   one fixed batch of random token ids, interleaved repetitions, medians (as
   ``benchmarks/overhead.py``): ``sft`` (beta 0; ``sft_unfused``: with the model's own logits),
   ``adaptive_all`` (every row regularised, the
   policy's output layer fused into the chunked loss), ``adaptive_all_unfused`` (the same with
   ``fused_output_layer=False``: the policy's ``[B, T, V]`` logits are materialised),
   ``ref_all`` (the reference forward alone), and with a reference cache of that batch switched on
   (``use_reference_cache``): ``cached_all`` and ``cached_25`` (a quarter of the rows regularised).
   P1 = ``adaptive_all / (sft + ref_all)``; P2 (step) = ``cached_all / sft``.
2. **Peak memory** of ``sft``, ``adaptive_all``, ``adaptive_all_unfused`` and ``cached_all``: one fresh
   process each (``--memory-worker``), as ``benchmarks/overhead.py`` measures it.
3. **KL error of the cache** on real text: GSM8K train rows (question -> worked answer) through
   the model's chat template; the policy is the LoRA model after a few SFT steps on them (so that
   it differs from the reference). Per response token, the exact full-vocabulary forward KL against
   :func:`lightning_safety.reference_cache.topk_kl` for several k: median and p99 of the absolute and
   relative error, the share of the reference's mass in the top k, the summed KL's ratio; disk per
   1M response tokens.
4. **A 20-epoch run**, real: the same GSM8K rows, ``--epochs`` passes over them in batches of
   ``--batch-size``, wall time of plain SFT, of adaptive KL with the reference forward every step,
   and of ``precompute_reference`` + adaptive KL from the cache; ratios to SFT (P2, total).

Reproduce::

    python benchmarks/reference_cache.py                      # SmolLM2-135M-Instruct, ~15 min on 2 CPU cores
    python benchmarks/reference_cache.py --model tiny-random-llama --epochs 2 --repeats 1 --no-memory   # seconds

Run it alone on an idle machine. Needs the shared public data folder (``--data``) for GSM8K.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fail  # noqa: E402
from steptime import (  # noqa: E402
    build_lora_setup, environment_text, markdown_table, measure_peak, memory_measure_note, mib_text, optimizer_step,
    pick_device, prepare_process, ready_module, run_interleaved, run_memory_worker, seconds_text, train_step,
)

_RESULT_PREFIX = "REFERENCE_CACHE_MEMORY "
_MEMORY_STEPS = 2
MEMORY_CONFIGS = ("sft", "adaptive_all", "adaptive_all_unfused", "cached_all")
TOP_KS = (16, 32, 64, 128)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64, help="k of the cache the step times and the 20-epoch run use")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--examples", type=int, default=16, help="GSM8K rows of the KL error and the 20-epoch run")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip", nargs="+", choices=["memory", "kl", "epochs"], default=[],
                        help="parts to leave out (the step times always run)")
    parser.add_argument("--memory-worker", choices=MEMORY_CONFIGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, default=None, help="write results.md and results.json here")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------- 1. step time
def build_setup(args: argparse.Namespace, device: torch.device, cache_dir: Path) -> tuple[Any, Any]:
    """The LoRA setup (batches with ids) and a reference cache of its batch, opened."""
    from lightning_safety.reference_cache import ReferenceCache

    setup = build_lora_setup(args.model, device=device, batch_size=args.batch_size, seq_len=args.seq_len,
                             prompt_len=args.prompt_len, lora_r=args.lora_r, seed=args.seed, chunk_size=args.chunk_size)
    ids = [f"row-{i}" for i in range(args.batch_size)]
    for batch in setup.batches.values():
        batch["id"] = ids
    if not (cache_dir / "meta.json").exists():
        setup.module.precompute_reference([setup.batches["sft"]], str(cache_dir), top_k=args.top_k)
    return setup, ReferenceCache.open(cache_dir)


def step_actions(setup: Any, cache: Any) -> dict:
    """One training step per configuration (fused or not, exact or cached reference) and the reference alone."""
    module = setup.module
    batch = setup.batches["sft"]

    def step(config: str, *, fused: bool = True, cached: bool = False):
        def run() -> None:
            module.fused_output_layer = fused
            module.use_reference_cache(cache if cached else None)
            try:
                train_step(setup, config)
            finally:
                module.fused_output_layer = True
                module.use_reference_cache(None)
        return run

    def reference_alone() -> None:
        keep = module._logits_to_keep(batch["labels"])
        logits = module.reference_forward(batch["input_ids"], batch["attention_mask"], logits_to_keep=keep)
        if hasattr(logits, "materialize"):
            logits.materialize()

    return {"sft": step("sft"), "sft_unfused": step("sft", fused=False), "adaptive_all": step("adaptive_all"),
            "adaptive_all_unfused": step("adaptive_all", fused=False), "ref_all": reference_alone,
            "cached_all": step("adaptive_all", cached=True), "cached_25": step("adaptive_25", cached=True)}


# ----------------------------------------------------------------------------------- 2. memory
def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device()
    setup, cache = build_setup(args, device, args.cache_dir)
    action = step_actions(setup, cache)[args.memory_worker]
    return {"config": args.memory_worker, **measure_peak(device, [setup.module], action, args.warmup + _MEMORY_STEPS)}


def run_memory(args: argparse.Namespace, cache_dir: Path, argv: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    for config in MEMORY_CONFIGS:
        print(f"[reference_cache] memory: {config} in a fresh process", file=sys.stderr, flush=True)
        worker = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-worker", config, "--cache-dir", str(cache_dir)]
        results[config] = run_memory_worker(worker, _RESULT_PREFIX, config)
    return results


# ----------------------------------------------------------------------------------- 3. KL error on real text
def gsm8k_module(args: argparse.Namespace, device: torch.device, reference_cache: str | None = None) -> tuple[Any, Any, list[dict]]:
    """A LoRA module and batches of GSM8K train rows (question -> worked answer) with ids."""
    from lightning_safety.data import ChatSFTDataModule
    from lightning_safety.models import LoraSettings
    from lightning_safety.module import SafeFineTuning
    from lightning_safety.schedules import ConstantBeta

    path = args.data / "gsm8k_train.jsonl"
    if not path.is_file():
        fail(f"{path} is missing: pass --data pointing at the shared public data (GSM8K train)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][: args.examples]
    records = [{"prompt": row["question"], "response": row["answer"], "id": f"gsm8k-{i}"} for i, row in enumerate(rows)]
    torch.manual_seed(args.seed)
    module = SafeFineTuning(args.model, lora=LoraSettings(r=args.lora_r, dropout=0.0), reference="adapter_disabled",
                            chunk_size=args.chunk_size, schedule=ConstantBeta(0.0), optimizer=torch.optim.AdamW,
                            reference_cache=reference_cache)
    data = ChatSFTDataModule(train=records, tokenizer=args.model, max_length=args.max_length,
                             batch_size=args.batch_size, seed=args.seed)
    data.setup("fit")
    batches = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in data.train_dataloader()]
    return module, data, batches


@torch.no_grad()
def kl_error(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from lightning_safety.reference_cache import CachedTokens, topk_kl

    module, _, batches = gsm8k_module(args, device)
    optimizer = ready_module(module, device)
    with torch.enable_grad():  # move the policy away from the reference: a few SFT steps at a high rate
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        for _ in range(3):
            for batch in batches:
                optimizer_step(module.training_step(batch, 0)["loss"], optimizer)
    module.eval()
    exact, approx = [], {k: [] for k in TOP_KS}
    mass = {k: [] for k in TOP_KS}
    for batch in batches:
        labels = batch["labels"]
        rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        policy = module(batch["input_ids"], batch["attention_mask"])[rows, positions].float()  # [N, V]
        reference = module.reference_forward(batch["input_ids"], batch["attention_mask"])
        reference = (reference.materialize() if hasattr(reference, "materialize") else reference)[rows, positions].float()
        logq, logp = torch.log_softmax(reference, -1), torch.log_softmax(policy, -1)
        exact.append((logq.exp() * (logq - logp)).sum(-1))
        for k in TOP_KS:
            values, ids = logq.topk(k, dim=-1)
            tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1).clamp_min(-87.3)
            approx[k].append(topk_kl(policy, CachedTokens(ids, values, tail)))
            mass[k].append(values.exp().sum(-1))
    exact_t = torch.cat(exact)
    result: dict[str, Any] = {"tokens": int(exact_t.numel()), "exact_kl_mean": float(exact_t.mean()),
                              "exact_kl_median": float(exact_t.median()), "per_k": {}}
    for k in TOP_KS:
        got = torch.cat(approx[k])
        error = exact_t - got
        relative = error / exact_t.clamp_min(1e-8)
        result["per_k"][k] = {
            "abs_median": float(error.median()), "abs_p99": float(error.quantile(0.99)),
            "rel_median": float(relative.median()), "rel_p99": float(relative.quantile(0.99)),
            "sum_ratio": float(got.sum() / exact_t.sum()), "mass_median": float(torch.cat(mass[k]).median()),
            "mass_p01": float(torch.cat(mass[k]).quantile(0.01)), "bytes_per_token": k * 8 + 4,
            "lower_bound_violations": int((error < -1e-5).sum()),
        }
    return result


# ----------------------------------------------------------------------------------- 4. a 20-epoch run
def epochs_run(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    from lightning_safety.schedules import ConstantBeta, LinearRiskSchedule

    results: dict[str, Any] = {}
    cache_dir = work / "epochs_cache"
    for name in ("sft", "adaptive_exact", "adaptive_cached"):
        precompute = 0.0
        if name == "adaptive_cached":  # the reference runs once per example, then never again
            exact, _, batches = gsm8k_module(args, device)
            ready_module(exact, device)
            start = time.perf_counter()
            exact.precompute_reference(batches, str(cache_dir), top_k=args.top_k)
            precompute = time.perf_counter() - start
            del exact
        module, _, batches = gsm8k_module(args, device, str(cache_dir) if name == "adaptive_cached" else None)
        module.schedule = ConstantBeta(0.0) if name == "sft" else LinearRiskSchedule(0.1, 0.9)
        generator = torch.Generator().manual_seed(args.seed)
        for batch in batches:
            batch["risk"] = torch.rand(len(batch["id"]), generator=generator).to(device)
        optimizer = ready_module(module, device)
        steps = 0
        train_start = time.perf_counter()
        for epoch in range(args.epochs):
            for batch in batches:
                optimizer_step(module.training_step(batch, 0)["loss"], optimizer)
                steps += 1
            print(f"[reference_cache] {name}: epoch {epoch + 1}/{args.epochs}", file=sys.stderr, flush=True)
        train = time.perf_counter() - train_start
        results[name] = {"total_s": precompute + train, "train_s": train, "precompute_s": precompute, "steps": steps}
    return results


# ----------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, device: torch.device, times: dict, memory: dict, error: dict, epochs: dict) -> str:
    med = {name: statistics.median(values) for name, values in times.items()}
    lines = ["# Reference cache and fused output layer", "",
             f"Model `{args.model}`, LoRA r={args.lora_r} (reference = adapter off), B x T = {args.batch_size} x "
             f"{args.seq_len} ({args.seq_len - args.prompt_len} response tokens per row), chunk_size={args.chunk_size}, "
             f"cache top_k={args.top_k}; {environment_text(device)}.", "",
             "## Step time (median of interleaved repeats)", ""]
    rows = [[name, seconds_text(med[name]), f"{med[name] / med['sft']:.3f}"] for name in times]
    lines += markdown_table(["configuration", "median step", "x SFT"], "lrr", rows)
    limit = med["sft"] + med["ref_all"]
    lines += ["", f"- P1: adaptive KL on all rows / its limit (SFT + reference forward) = "
                  f"{med['adaptive_all']:.3f} / {limit:.3f} = **{med['adaptive_all'] / limit:.3f}** "
                  f"(unfused output layer: {med['adaptive_all_unfused'] / limit:.3f})",
              f"- P2 (per step, from the cache): cached_all / SFT = **{med['cached_all'] / med['sft']:.3f}** "
              f"(/ SFT with the model's own logits: {med['cached_all'] / med['sft_unfused']:.3f}); "
              f"cached_25 / SFT = {med['cached_25'] / med['sft']:.3f}"]
    if memory:
        lines += ["", "## Peak memory (fresh process each)", ""]
        base = memory["sft"]["peak"] - memory["sft"]["baseline"]
        rows = [[name, mib_text(m["baseline"]), mib_text(m["peak"]), mib_text(m["peak"] - m["baseline"]),
                 f"{(m['peak'] - m['baseline']) / base:.3f}"] for name, m in memory.items()]
        lines += markdown_table(["configuration", "baseline", "peak", "step working set", "x SFT working set"], "lrrrr", rows)
        lines += ["", f"Measured as: {memory_measure_note(memory.values())}."]
    if error:
        lines += kl_error_lines(error)
    if epochs:
        lines += epochs_lines(args, epochs)
    return "\n".join(lines) + "\n"


def kl_error_lines(error: dict) -> list[str]:
    lines = ["", f"## KL error of the top-k cache on real text ({error['tokens']} GSM8K response tokens)", "",
              f"Exact forward KL per token: mean {error['exact_kl_mean']:.4f}, median {error['exact_kl_median']:.4f} nats "
              "(policy = LoRA after 3 SFT epochs at lr 1e-3 on the same rows).", ""]
    rows = [[str(k), f"{e['mass_median']:.4f}", f"{e['mass_p01']:.3f}", f"{e['abs_median']:.2e}", f"{e['abs_p99']:.2e}",
             f"{100 * e['rel_median']:.2f}%", f"{100 * e['rel_p99']:.1f}%", f"{e['sum_ratio']:.4f}",
             str(e["lower_bound_violations"]), f"{e['bytes_per_token']}", f"{e['bytes_per_token'] / 1e3:.2f} GB"]
            for k, e in error["per_k"].items()]
    lines += markdown_table(["k", "top-k mass (median)", "top-k mass (p1)", "abs error median", "abs error p99",
                             "rel error median", "rel error p99", "sum KL ratio", "above exact", "bytes/token",
                             "disk per 1M tokens"], "rrrrrrrrrrr", rows)
    return lines


def epochs_lines(args: argparse.Namespace, epochs: dict) -> list[str]:
    sft = epochs["sft"]["total_s"]
    lines = ["", f"## {args.epochs} epochs over {args.examples} GSM8K rows (real run, wall time)", ""]
    rows = [[name, f"{e['steps']}", f"{e['precompute_s']:.1f} s", f"{e['total_s']:.1f} s", f"{e['total_s'] / sft:.3f}"]
            for name, e in epochs.items()]
    lines += markdown_table(["run", "steps", "precompute", "total", "x SFT"], "lrrrr", rows)
    lines += ["", f"- P2 (total): {args.epochs}-epoch run with the cache (precompute included) / SFT = "
                  f"**{epochs['adaptive_cached']['total_s'] / sft:.3f}**; with the reference every step "
                  f"{epochs['adaptive_exact']['total_s'] / sft:.3f}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prepare_process()
    if args.memory_worker is not None:
        print(_RESULT_PREFIX + json.dumps(memory_worker(args)), flush=True)
        return 0
    device = pick_device()
    with tempfile.TemporaryDirectory(prefix="reference-cache-bench-") as work_dir:
        work = Path(work_dir)
        cache_dir = work / "step_cache"
        setup, cache = build_setup(args, device, cache_dir)
        actions = step_actions(setup, cache)
        times = run_interleaved(actions, warmup=args.warmup, repeats=args.repeats, device=device, tag="reference_cache")
        del setup, cache, actions
        memory = run_memory(args, cache_dir, argv) if args.memory and "memory" not in args.skip else {}
        error = {} if "kl" in args.skip else kl_error(args, device)
        epochs = {} if "epochs" in args.skip else epochs_run(args, device, work)
    text = report(args, device, times, memory, error, epochs)
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "results.md").write_text(text, encoding="utf-8")
        payload = {"times": times, "memory": memory, "kl_error": error, "epochs": epochs, "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        (args.out_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
