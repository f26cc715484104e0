#!/usr/bin/env python
"""Adaptive KL side by side with TRL's GKD trainer and the paper's released recipe, in one process.

What is compared
----------------
Same model, same fixed, seeded batch of random token ids ``[B, T]`` (the first ``--prompt-len``
tokens of each row are prompt, label -100), same LoRA settings (rank ``--lora-r``, alpha 32,
dropout 0, all linear layers), same optimizer (``torch.optim.AdamW`` over the adapter). One *step*
is loss -> ``backward`` -> ``optimizer.step`` -> ``zero_grad``:

* ``sft`` (d): plain LoRA SFT, ``SafeFineTuning`` with ``ConstantBeta(0)``: the reference never runs.
* ``ours_all`` (a): our adaptive KL on every row: ``SafeFineTuning(lora=..., reference=
  "adapter_disabled")``, ``LinearRiskSchedule(0.1, 0.9)`` with uniform risk (the risk is a batch
  column, as a cached score would be); the reference is the base with the adapter switched off.
* ``ours_25``: the risk-gated setting: ``ThresholdRiskSchedule(0.5, 0, 0.9)`` with a quarter of the
  rows at risk 1: the reference runs on those rows only.
* ``gkd`` (b): TRL's ``GKDTrainer`` (``trl.experimental.gkd``) configured for the same objective;
  its student is our module's LoRA policy (the same ``PeftModel``), its teacher a frozen full copy
  of the base model (GKD takes a teacher *model*; it cannot switch the student's adapter off). Its
  step is ``trainer.compute_loss(model, batch)`` (student forward, teacher forward under no_grad,
  generalized JSD; on CUDA it also empties the allocator cache every step) -> backward -> the same
  AdamW step; ``train()``'s loop (data loading, logging, scheduler) is left out, as Lightning's is
  for ours.
* ``paper`` (c): the paper's released recipe reproduced in shape: a second full copy of the model
  as the reference (``reference="model_copy"``) and a judge call for every example in every step
  (``JudgeRisk`` without a cache: ``EmbeddingJudge``, all-MiniLM-L6-v2 with a logistic head fitted
  on ``--judge-prompts`` harmful and benign prompts of the package's demo data, scoring each row's
  request and response, decoded from its tokens). Its judge score goes through
  ``LinearRiskSchedule(0.1, 0.9)``: beta stays in [0.1, 0.9] as the authors' clamp keeps it, so
  every row needs the reference. Not reproduced: the authors' micro-batches of one example (a
  batching choice, not a cost of the method: every configuration here steps on the same B rows).

The GKD settings that make its loss ours (read from ``trl/experimental/gkd``, TRL 1.16.0):

=================================  ==========================================================
GKD (``GKDConfig``)                ours (``SafeFineTuning`` / ``adaptive_kl_loss``)
=================================  ==========================================================
``beta=0.0``: generalized JSD at   ``direction="forward"``: KL(pi_ref || pi_theta) summed
0 is ``F.kl_div(student_logp,      over the vocabulary per response token (GKD ``beta=1.0``
teacher_logp, log_target=True)``   is ``direction="reverse"``)
= KL(teacher || student)
``lmbda=0.0``, ``seq_kd=False``:   the dataset's tokens (we never generate in training)
no student or teacher generation
loss at temperature 1              no temperature (GKD's ``temperature`` only samples, which
(``compute_loss`` passes none)     ``lmbda=0`` never does)
mean over tokens with label        ``normalization="token"``: mean over the response tokens
!= -100 (``batchmean``)
no NLL term, one weight for all    ``ConstantBeta(1.0)`` with ``weighting="convex"``
rows                               (alpha = 0): pure KL. Per-row beta and the (1 - beta) NLL
                                   mix have no GKD setting
frozen teacher model               the reference (here the adapter switched off)
``disable_dropout=True``           LoRA dropout 0; the reference runs in eval mode
``activation_checkpointing=False`` (TRL defaults to on), ``bf16=False`` (TRL defaults to on):
                                   both run in the model's dtype without recomputation
=================================  ==========================================================

So GKD computes the same KL term over the same tokens (the check below), while our ``ours_all``
step also computes the NLL (the label's log-probability, read from the same log-softmax) and
per-row weights. GKD computes full ``[B, T, V]`` logits for both models; ours computes logits
from the first response position on and projects the reference's per chunk.

Checks, on the same batch and weights (LoRA B drawn from N(0, 0.05^2) for the check, so that the
policy differs from the reference; the trained adapter is restored afterwards): GKD's
``compute_loss`` against our module's ``compute_loss`` with ``ConstantBeta(1.0)`` (same logits in:
same forward KL, float32 tolerance 1e-6 + 1e-4 x |KL|); the reference rows, teacher rows and judge
calls of every step are counted and checked against each configuration.

Timing and memory follow ``overhead.py`` (``steptime.py``): all timings in one process,
interleaved (each repetition runs every configuration once, in a rotating order), medians; peak
memory in a fresh process per configuration (CUDA: ``max_memory_allocated``; CPU: peak RSS after
the weights were paged in and the high-water mark reset).

Reproduce
---------
::

    pip install -c constraints.txt -e ".[bench]"           # TRL 1.16.0 (torch stays pinned)
    python benchmarks/peers.py --out-dir benchmarks/results # SmolLM2-135M-Instruct, B=8, T=128, 7 repeats
    python benchmarks/peers.py --quick --out-dir /tmp/peers  # tiny random model: checks the machinery

Run the real one on an otherwise idle machine: other jobs skew both the timings and the RSS.
Outputs with ``--out-dir``: ``peers.md`` (the tables, also printed) and ``peers.json`` (every number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from steptime import (LoraSetup, add_run_arguments, build_lora_setup, check_run_arguments, counting_reference_rows,
                      environment_text, markdown_table, measure_peak, memory_measure_note, mib_text, optimizer_step,
                      pick_device, prepare_process, ready_module, risky_row_count, run_interleaved, run_memory_worker,
                      seconds_text, token_batch, train_step, unique_storage_bytes)

CONFIGS = ("sft", "ours_all", "ours_25", "gkd", "paper")
ROW_ORDER = ("sft", "ours_all", "gkd", "paper", "ours_25")  # the tables: the all-rows peers, then the gated one
# Our configurations are steptime's, under the names of this comparison.
_LORA_CONFIG = {"sft": "sft", "ours_all": "adaptive_all", "ours_25": "adaptive_25"}
LABELS = {
    "sft": "(d) plain LoRA SFT: `ConstantBeta(0)`",
    "ours_all": "(a) ours, adaptive KL on all rows: LoRA, reference = adapter off",
    "ours_25": "ours, risk-gated: `ThresholdRiskSchedule(0.5, 0, 0.9)`, 25% rows risky",
    "gkd": "(b) TRL GKD, `lmbda=0, beta=0`: frozen teacher = full copy",
    "paper": "(c) paper recipe: full-copy reference + judge per example per step",
}
_RESULT_PREFIX = "PEERS_MEMORY_RESULT "
_MEMORY_STEPS = 2
_CHECK_LORA_STD = 0.05
_QUICK = {"model": "tiny-random-llama", "batch_size": 4, "seq_len": 32, "prompt_len": 16, "repeats": 2,
          "judge_prompts": 6}
_DEFAULTS = {"model": "smollm2-135m-instruct", "batch_size": 8, "seq_len": 128, "prompt_len": 64, "repeats": 7,
             "judge_prompts": 16}


# ----------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Median step time and peak memory of adaptive KL, TRL's GKD, the paper's recipe and plain SFT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random model, 4 x 32 tokens, 2 repeats")
    parser.add_argument("--model", default=None, help=f"model alias, folder, GGUF or hub id (default {_DEFAULTS['model']})")
    parser.add_argument("--dtype", default=None, help="weights dtype (float32, bfloat16, float16); default: the library's")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {_DEFAULTS['batch_size']}")
    parser.add_argument("--seq-len", type=int, default=None, help=f"default {_DEFAULTS['seq_len']}")
    parser.add_argument("--prompt-len", type=int, default=None, help=f"leading tokens per row with label -100 (default {_DEFAULTS['prompt_len']})")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=64, help="SafeFineTuning(chunk_size=...), as the shipped LoRA recipe")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repetitions of every configuration (default {_DEFAULTS['repeats']})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--judge-prompts", type=int, default=None, help=f"harmful and benign demo prompts the judge's head is fitted on, each (default {_DEFAULTS['judge_prompts']})")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write peers.md and peers.json here")
    add_run_arguments(parser, CONFIGS)
    args = parser.parse_args(argv)
    for name, default in (_QUICK if args.quick else _DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    check_run_arguments(parser, args)
    if args.judge_prompts < 2:
        parser.error("--judge-prompts must be >= 2 (the judge's head needs two of each class)")
    return args


def worker_argv(args: argparse.Namespace, config: str) -> list[str]:
    """Command line that re-runs this script as a memory worker with the same settings."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", config]
    for flag in ("model", "batch_size", "seq_len", "prompt_len", "lora_r", "chunk_size", "warmup", "judge_prompts",
                 "seed", "dtype", "device", "threads"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    return argv


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (what differs from the defaults)."""
    parts = ["python", "benchmarks/peers.py"] + (["--quick"] if args.quick else [])
    defaults = _QUICK if args.quick else _DEFAULTS
    for name in ("model", "batch_size", "seq_len", "prompt_len", "repeats", "judge_prompts"):
        if getattr(args, name) != defaults[name]:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    for name, default in (("lora_r", 16), ("chunk_size", 64), ("warmup", 1), ("seed", 0), ("dtype", None), ("device", None)):
        if getattr(args, name) != default:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return shlex.join(parts)


# ----------------------------------------------------------------------------------- the peers
@dataclass
class GKDSetup:
    trainer: Any  # trl.experimental.gkd.GKDTrainer
    batch: dict[str, Tensor]  # input_ids, attention_mask, labels [B, T]: the same tokens as ours
    optimizer: torch.optim.Optimizer  # our module's AdamW: the student is our policy
    output_dir: tempfile.TemporaryDirectory  # the trainer requires one; nothing is written, removed with this


@dataclass
class PaperSetup:
    module: Any  # SafeFineTuning, reference="model_copy", risk=JudgeRisk (no cache)
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]  # the same tokens, plus each row's decoded conversation for the judge
    judge: Any  # EmbeddingJudge


@dataclass
class Peers:
    lora: LoraSetup | None
    gkd: GKDSetup | None
    paper: PaperSetup | None
    device: torch.device


def frozen_base(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """A second copy of the base model, frozen and in eval mode (GKD's teacher)."""
    from lightning_safety.models import load_causal_lm
    from lightning_safety.reference import frozen_copy

    return frozen_copy(load_causal_lm(args.model, dtype=args.dtype)).to(device)


def build_gkd(args: argparse.Namespace, lora: LoraSetup) -> GKDSetup:
    """TRL's GKD trainer on our module's LoRA policy, with a frozen full copy as the teacher."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from lightning_safety.models import load_tokenizer

    device = lora.device
    output_dir = tempfile.TemporaryDirectory(prefix="peers-gkd-")
    settings: dict[str, Any] = {
        "output_dir": output_dir.name,
        "lmbda": 0.0,  # never generate on-policy: train on the dataset's tokens
        "beta": 0.0,  # generalized JSD at 0 = forward KL(teacher || student)
        "seq_kd": False,
        "temperature": 1.0,
        "disable_dropout": True,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.seq_len,
        "bf16": False,  # TRL defaults to bf16 autocast: keep both sides in the model's dtype
        "fp16": False,
        "use_cpu": device.type == "cpu",
        "report_to": "none",
        "save_strategy": "no",
        "seed": args.seed,
    }
    names = {field.name for field in dataclasses.fields(GKDConfig)}
    # TRL turns recomputation on by default; transformers >= 5.x names it activation_checkpointing.
    settings["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    tokenizer = load_tokenizer(args.model)
    # The trainer wants a dataset for its own loop, which is not run here.
    placeholder = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    trainer = GKDTrainer(
        model=lora.module.policy,
        teacher_model=frozen_base(args, device),
        args=GKDConfig(**settings),
        train_dataset=placeholder,
        processing_class=tokenizer,
    )
    base = trainer.model.get_base_model()
    if trainer.model is not lora.module.policy or getattr(base, "is_gradient_checkpointing", False):
        raise RuntimeError("GKDTrainer replaced or changed the student: the comparison would not be like for like")
    sft = lora.batches["sft"]
    batch = {key: sft[key] for key in ("input_ids", "attention_mask", "labels")}
    return GKDSetup(trainer=trainer, batch=batch, optimizer=lora.optimizer, output_dir=output_dir)


def conversations(tokenizer: Any, input_ids: Tensor, prompt_len: int) -> list[list[dict[str, str]]]:
    """Each row's prompt and response tokens as a user and an assistant turn (what the judge reads)."""
    return [
        [{"role": "user", "content": tokenizer.decode(row[:prompt_len])},
         {"role": "assistant", "content": tokenizer.decode(row[prompt_len:])}]
        for row in input_ids.tolist()
    ]


def build_paper(args: argparse.Namespace, device: torch.device) -> PaperSetup:
    """The released recipe's shape: a second full copy as the reference, the judge on every example every step."""
    from lightning_safety.demo_data import load_demo_prompts
    from lightning_safety.schedules import LinearRiskSchedule
    from lightning_safety.models import LoraSettings, load_tokenizer
    from lightning_safety.module import SafeFineTuning
    from lightning_safety.risk import EmbeddingJudge, JudgeRisk

    judge = EmbeddingJudge(device=device)
    count = args.judge_prompts
    judge.fit(load_demo_prompts("harmful")[:count], load_demo_prompts("benign")[:count], seed=args.seed)
    torch.manual_seed(args.seed)  # the same LoRA initialisation as ours
    module = SafeFineTuning(
        args.model,
        dtype=args.dtype,
        lora=LoraSettings(r=args.lora_r, dropout=0.0),
        reference="model_copy",
        chunk_size=args.chunk_size,
        schedule=LinearRiskSchedule(0.1, 0.9),
        risk=JudgeRisk(judge, include_response=True),
        optimizer=torch.optim.AdamW,
    )
    optimizer = ready_module(module, device)
    # The same tokens as ours: steptime draws the token ids first from the same seeded generator.
    vocab = int(module.policy.get_output_embeddings().weight.shape[0])
    tokens = token_batch(vocab, args.batch_size, args.seq_len, args.prompt_len, torch.Generator().manual_seed(args.seed))
    batch: dict[str, Any] = {key: value.to(device) for key, value in tokens.items()}
    batch["messages"] = conversations(load_tokenizer(args.model), tokens["input_ids"], args.prompt_len)
    return PaperSetup(module=module, optimizer=optimizer, batch=batch, judge=judge)


def build_peers(args: argparse.Namespace, device: torch.device, configs: tuple[str, ...] = CONFIGS) -> Peers:
    """What ``configs`` need: our LoRA module (also GKD's student), GKD's trainer, the paper's module."""
    lora = None
    if set(configs) & {"sft", "ours_all", "ours_25", "gkd"}:
        lora = build_lora_setup(
            args.model, device=device, batch_size=args.batch_size, seq_len=args.seq_len, prompt_len=args.prompt_len,
            lora_r=args.lora_r, seed=args.seed, dtype=args.dtype, chunk_size=args.chunk_size,
        )
    gkd = build_gkd(args, lora) if "gkd" in configs and lora is not None else None
    paper = build_paper(args, device) if "paper" in configs else None
    return Peers(lora=lora, gkd=gkd, paper=paper, device=device)


def held_modules(peers: Peers, config: str) -> list[nn.Module]:
    """The models a configuration keeps in memory (weights, frozen copies, judge encoder)."""
    if config == "gkd":
        return [peers.gkd.trainer.model, peers.gkd.trainer.teacher_model]
    if config == "paper":
        return [peers.paper.module, peers.paper.judge.encoder.model, peers.paper.judge.head]
    return [peers.lora.module]


def gkd_step(gkd: GKDSetup) -> None:
    """GKD's compute_loss (student and teacher forward, generalized JSD) -> backward -> AdamW step."""
    trainer = gkd.trainer
    trainer.model.train()
    optimizer_step(trainer.compute_loss(trainer.model, dict(gkd.batch)), gkd.optimizer)


def paper_step(paper: PaperSetup) -> None:
    """Judge every row -> beta -> full-copy reference forward -> loss -> backward -> AdamW step."""
    optimizer_step(paper.module.training_step(paper.batch, 0)["loss"], paper.optimizer)


def step_actions(peers: Peers, configs: tuple[str, ...] = CONFIGS) -> dict[str, Callable[[], None]]:
    actions: dict[str, Callable[[], None]] = {}
    for config in configs:
        if config in _LORA_CONFIG:
            actions[config] = lambda name=_LORA_CONFIG[config]: train_step(peers.lora, name)
        elif config == "gkd":
            actions[config] = lambda: gkd_step(peers.gkd)
        else:
            actions[config] = lambda: paper_step(peers.paper)
    return actions


# ----------------------------------------------------------------------------------- counting
def expected_counts(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Reference (or teacher) rows and judge calls each configuration must make per step."""
    size = args.batch_size
    rows = {"sft": 0, "ours_all": size, "ours_25": risky_row_count(size), "gkd": size, "paper": size}
    return {name: {"reference_rows": rows[name], "judge_calls": size if name == "paper" else 0} for name in CONFIGS}


@contextmanager
def counting(peers: Peers) -> Iterator[Callable[[], tuple[int, int]]]:
    """Count reference rows (ours and the paper's: ``Reference.logits``; GKD's teacher: a forward
    hook) and judge calls; yields a function returning the (rows, calls) totals so far."""
    teacher_rows: list[int] = []
    handle = None
    if peers.gkd is not None:
        def count_teacher(module: nn.Module, args: tuple, kwargs: dict) -> None:
            teacher_rows.append(int(kwargs["input_ids"].shape[0]))

        handle = peers.gkd.trainer.teacher_model.register_forward_pre_hook(count_teacher, with_kwargs=True)
    judge = peers.paper.judge if peers.paper is not None else None
    try:
        with counting_reference_rows() as rows:
            yield lambda: (sum(rows) + sum(teacher_rows), judge.calls if judge is not None else 0)
    finally:
        if handle is not None:
            handle.remove()


def counted_actions(
    actions: Mapping[str, Callable[[], None]], totals: Callable[[], tuple[int, int]], record: dict[str, list[tuple[int, int]]]
) -> dict[str, Callable[[], None]]:
    """``actions`` that also append their (reference rows, judge calls) to ``record[name]``."""

    def wrap(name: str, action: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            rows, calls = totals()
            action()
            after_rows, after_calls = totals()
            record[name].append((after_rows - rows, after_calls - calls))

        return run

    return {name: wrap(name, action) for name, action in actions.items()}


# ----------------------------------------------------------------------------------- measurements
def run_timings(args: argparse.Namespace, peers: Peers) -> dict[str, dict[str, Any]]:
    record: dict[str, list[tuple[int, int]]] = {name: [] for name in CONFIGS}
    with counting(peers) as totals:
        actions = counted_actions(step_actions(peers), totals, record)
        times = run_interleaved(actions, warmup=args.warmup, repeats=args.repeats, device=peers.device, tag="peers")
    return {
        name: {
            "times": times[name],
            "median": statistics.median(times[name]),
            "min": min(times[name]),
            "max": max(times[name]),
            "reference_rows": statistics.fmean(rows for rows, _ in record[name]),
            "judge_calls": statistics.fmean(calls for _, calls in record[name]),
        }
        for name in CONFIGS
    }


@torch.no_grad()
def loss_agreement(peers: Peers) -> dict[str, Any]:
    """GKD's loss and our KL (``ConstantBeta(1)``: alpha = 0) on the same batch and weights.

    The adapter's B matrices are drawn from N(0, 0.05^2) for the check (a fresh adapter is the
    reference itself, KL 0) and restored afterwards.
    """
    from lightning_safety.schedules import ConstantBeta

    module, gkd = peers.lora.module, peers.gkd
    lora_b = {name: p for name, p in module.policy.named_parameters() if "lora_B" in name}
    saved = {name: p.detach().clone() for name, p in lora_b.items()}
    generator = torch.Generator().manual_seed(1234)
    for p in lora_b.values():
        p.copy_(torch.randn(p.shape, generator=generator) * _CHECK_LORA_STD)
    schedule = module.schedule
    module.schedule = ConstantBeta(1.0)
    try:
        ours, _, _ = module.compute_loss(peers.lora.batches["sft"], update_schedule=False)
        theirs = gkd.trainer.compute_loss(gkd.trainer.model, dict(gkd.batch))
    finally:
        module.schedule = schedule
        for name, p in lora_b.items():
            p.copy_(saved[name])
    ours_value, gkd_value = float(ours.loss), float(theirs)
    dtype = next(module.policy.parameters()).dtype
    # float32 rounding of a sum over the vocabulary; half-precision logits are compared loosely.
    atol, rtol = (1e-6, 1e-4) if dtype == torch.float32 else (1e-2, 5e-2)
    tolerance = atol + rtol * abs(gkd_value)
    diff = abs(ours_value - gkd_value)
    return {
        "ours_kl": ours_value,
        "ours_kl_term": float(ours.kl),
        "gkd_loss": gkd_value,
        "abs_diff": diff,
        "rel_diff": diff / max(abs(gkd_value), 1e-30),
        "tolerance": tolerance,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_b_std": _CHECK_LORA_STD,
        "ok": diff <= tolerance and gkd_value > 0,
    }


def weight_bytes(peers: Peers) -> dict[str, int]:
    """Unique parameter and buffer storages each configuration holds (shared weights count once)."""
    held = {}
    for config in CONFIGS:
        tensors = [t for m in held_modules(peers, config) for t in (*m.parameters(), *m.buffers())]
        held[config] = unique_storage_bytes(tensors)
    return held


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: build what one configuration needs, reset the peak, warm up, run 2 steps."""
    config = args.memory_worker
    device = pick_device(args.device)
    # Every worker imports what any configuration needs, so that on CPU the RSS of imported code
    # (TRL and its dependencies, the judge's modules) is the same for all and only models differ.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl.experimental.gkd  # noqa: F401

    import lightning_safety.risk.judges.embedding  # noqa: F401

    peers = build_peers(args, device, (config,))
    record: dict[str, list[tuple[int, int]]] = {name: [] for name in CONFIGS}
    with counting(peers) as totals:
        action = counted_actions(step_actions(peers, (config,)), totals, record)[config]
        measured = measure_peak(device, held_modules(peers, config), action, args.warmup + _MEMORY_STEPS)
    return {"config": config, **measured, "reference_rows": sum(rows for rows, _ in record[config]),
            "judge_calls": sum(calls for _, calls in record[config])}


def run_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    expected = expected_counts(args)
    results = {}
    for config in CONFIGS:
        print(f"[peers] memory: {config} in a fresh process", file=sys.stderr, flush=True)
        result = run_memory_worker(worker_argv(args, config), _RESULT_PREFIX, config)
        for key in ("reference_rows", "judge_calls"):
            if result[key] != expected[config][key] * result["steps"]:
                raise RuntimeError(f"memory worker '{config}': {result[key]} {key}, expected "
                                   f"{expected[config][key] * result['steps']}")
        results[config] = result
    return results


# ----------------------------------------------------------------------------------- report
def _ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base > 0 else "n/a"


def _counts(entry: Mapping[str, Any], wanted: Mapping[str, int]) -> list[str]:
    """Counted reference rows and judge calls per step, flagged where they differ from what is expected."""
    return [f"{entry[key]:g}" if entry[key] == wanted[key] else f"{entry[key]:g} (expected {wanted[key]}!)"
            for key in ("reference_rows", "judge_calls")]


def timing_table(timings: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Mapping[str, int]]) -> list[str]:
    sft, ours = timings["sft"]["median"], timings["ours_all"]["median"]
    rows = [
        [f"`{name}`: {LABELS[name]}", *_counts(entry, expected[name]), seconds_text(entry["median"]),
         f"{seconds_text(entry['min'])} - {seconds_text(entry['max'])}", _ratio(entry["median"], sft),
         _ratio(entry["median"], ours)]
        for name, entry in ((name, timings[name]) for name in ROW_ORDER)
    ]
    header = ["Configuration", "Reference rows / step", "Judge calls / step", "Median step (s)", "Min - max (s)",
              "x SFT", "x ours (all rows)"]
    return markdown_table(header, "lrrrrrr", rows)


def gated_table(timings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """25% risky rows: only ours can skip the reference on the other rows."""
    sft, gated = timings["sft"]["median"], timings["ours_25"]["median"]
    why = {
        "ours_25": "reference on the risky rows only",
        "gkd": "the `gkd` step above: one weight for every row, the teacher runs on all of them",
        "paper": "the `paper` step above: beta >= 0.1 on every row, reference and judge on all of them",
    }
    rows = [[f"`{name}`", why[name], seconds_text(timings[name]["median"]), _ratio(timings[name]["median"], sft),
             _ratio(timings[name]["median"], gated)] for name in why]
    return markdown_table(["Configuration", "What the risky fraction changes", "Median step (s)", "x SFT", "x ours (25%)"],
                          "llrrr", rows)


def memory_table(memory: Mapping[str, Mapping[str, Any]], weights: Mapping[str, int]) -> list[str]:
    sft, ours = memory["sft"]["peak"], memory["ours_all"]["peak"]
    rows = [
        [f"`{name}`", mib_text(weights[name]), mib_text(entry["baseline"]), mib_text(entry["peak"]),
         mib_text(entry["peak"] - entry["baseline"]), _ratio(entry["peak"], sft), _ratio(entry["peak"], ours)]
        for name, entry in ((name, memory[name]) for name in ROW_ORDER)
    ]
    header = ["Configuration", "Weights held (MiB)", "Baseline after setup (MiB)", "Peak (MiB)",
              "Working set = peak - baseline (MiB)", "Peak x SFT", "Peak x ours (all rows)"]
    return markdown_table(header, "lrrrrrr", rows)


def weights_table(weights: Mapping[str, int]) -> list[str]:
    rows = [[f"`{name}`", mib_text(weights[name]), _ratio(weights[name], weights["ours_all"])]
            for name in ("ours_all", "gkd", "paper")]
    return markdown_table(["Configuration", "Weights held (MiB)", "x ours"], "lrr", rows)


def render(result: Mapping[str, Any]) -> str:
    timings, memory, agreement = result["timings"], result["memory"], result["agreement"]
    lines = [
        "## Peers: adaptive KL, TRL GKD, the paper's recipe, plain SFT",
        "",
        result["environment"],
        "",
        "### Step time (loss + backward + AdamW step)",
        "",
        *timing_table(timings, result["expected"]),
        "",
        "### Risk-gated: 25% of the rows risky",
        "",
        *gated_table(timings),
        "",
    ]
    if memory is not None:
        lines += [
            f"### Peak memory (fresh process per configuration: set-up, {result['settings']['warmup']} warm-up "
            f"+ {_MEMORY_STEPS} steps)",
            "",
            *memory_table(memory, result["weights"]),
            "",
        ]
    else:
        lines += ["### Weights held (parameters and buffers, shared storages once)", "", *weights_table(result["weights"]), ""]
    verdict = "agree" if agreement["ok"] else "**DISAGREE**"
    lines += [
        "### Same objective: GKD's loss against ours",
        "",
        f"GKD `compute_loss` (`lmbda=0, beta=0`) {agreement['gkd_loss']:.9g} vs our `compute_loss` with "
        f"`ConstantBeta(1.0)` {agreement['ours_kl']:.9g} on the same batch and weights ({agreement['dtype']}; LoRA B "
        f"~ N(0, {agreement['lora_b_std']}^2) so that the policy differs from the reference): |difference| "
        f"{agreement['abs_diff']:.3g} (relative {agreement['rel_diff']:.3g}), tolerance {agreement['tolerance']:.3g}: "
        f"{verdict}.",
        "",
        "Notes:",
        "",
        "* All timings in one process; each repetition runs every configuration once, in a rotating order; medians "
        "over the repetitions. `sft`, `ours_*` and `gkd` train the same LoRA adapter with the same AdamW (its "
        "steps change the adapter equally for all); `paper` has its own module, adapter and AdamW.",
        "* Reference rows / step: rows the frozen reference (GKD: the teacher) ran on, counted during the timed "
        "steps; judge calls / step: examples the judge scored.",
        "* `gkd` runs TRL's `compute_loss`, not `train()`: the loop around it (data loading, logging, scheduler) is "
        "left out, as Lightning's is for ours.",
    ]
    if memory is not None:
        lines.append(f"* Memory measure: {memory_measure_note(memory.values())}.")
        lines.append("* Weights held: unique parameter and buffer storages of the models each configuration keeps "
                     "(ours: base + LoRA; `gkd`: + a full teacher copy; `paper`: + a full reference copy + the judge). "
                     "Every memory worker imports TRL and the judge's code, so that imported code weighs the same in all.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process(args.cache, args.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # TRL's trainer set-up notices

    if args.memory_worker is not None:
        print(_RESULT_PREFIX + json.dumps(memory_worker(args)), flush=True)
        return 0

    device = pick_device(args.device)
    peers = build_peers(args, device)
    timings = run_timings(args, peers)
    agreement = loss_agreement(peers)
    weights = weight_bytes(peers)
    dtype = next(peers.lora.module.policy.parameters()).dtype
    environment = (
        f"model `{args.model}` ({str(dtype).removeprefix('torch.')}), B x T = {args.batch_size} x {args.seq_len} "
        f"({args.seq_len - args.prompt_len} response tokens per row), LoRA r={args.lora_r} all-linear, "
        f"chunk_size={args.chunk_size}, judge head fitted on {args.judge_prompts} + {args.judge_prompts} demo prompts; "
        f"{environment_text(device, ('transformers', 'peft', 'trl'))}; {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up round(s)"
    )
    del peers  # the memory workers need the room
    memory = run_memory(args) if args.memory else None
    expected = expected_counts(args)
    result = {
        "command": command_line(args),
        "quick": args.quick,
        "environment": environment,
        "settings": {name: getattr(args, name) for name in ("model", "dtype", "batch_size", "seq_len", "prompt_len",
                                                             "lora_r", "chunk_size", "repeats", "warmup",
                                                             "judge_prompts", "seed")},
        "configs": {name: LABELS[name] for name in CONFIGS},
        "expected": expected,
        "timings": timings,
        "weights": weights,
        "memory": memory,
        "agreement": agreement,
    }
    report = render(result)
    print(report, end="")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "peers.md").write_text(report)
        (args.out_dir / "peers.json").write_text(json.dumps(result, indent=2) + "\n")

    status = 0
    mismatched = [name for name in CONFIGS for key in ("reference_rows", "judge_calls")
                  if timings[name][key] != expected[name][key]]
    if mismatched:
        print(f"error: unexpected reference rows or judge calls for {', '.join(sorted(set(mismatched)))}", file=sys.stderr)
        status = 1
    if not agreement["ok"]:
        print("error: GKD's loss and our KL disagree: the comparison is not like for like", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
