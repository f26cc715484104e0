"""The experiments' one training recipe: a short, seeded LoRA fine-tuning on the CPU, merged into the weights.

The quick alignment (:mod:`~lightning_safety.experiments.alignment`) and every compared method
(:mod:`~lightning_safety.experiments.methods`) train the same way: chat SFT rows in a
:class:`~lightning_safety.data.ChatSFTDataModule`, a :class:`~lightning_safety.module.SafeFineTuning`
whose reference is the model with its adapter switched off, AdamW at a constant learning rate,
gradients clipped at norm 1, a Lightning ``Trainer`` without logger or checkpoints, and the LoRA
merged into the weights at the end. Only the data, the beta schedule, the sizes and the callbacks differ.

Example::

    done = fine_tune("smollm2-135m-instruct", rows, tokenizer, schedule=ConstantBeta(0.0), lora=LoraSettings(r=16),
                     epochs=2, lr=2e-4, weight_decay=0.0, max_length=128, batch_size=8, seed=0)
    done.model  # a plain Hugging Face model, in eval mode
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_safety.data.records import FieldMap
from lightning_safety.models import LoraSettings
from lightning_safety.quiet import quiet_training

__all__ = ["FineTuned", "fine_tune"]


@dataclass
class FineTuned:
    """What :func:`fine_tune` gives back.

    Attributes:
        model: the fine-tuned model with the LoRA merged in (a plain Hugging Face model, no PEFT
            wrapper), in eval mode; the base weights stay frozen as PEFT left them.
        steps: optimizer steps taken.
        seconds: wall time of ``trainer.fit``.
    """

    model: nn.Module
    steps: int
    seconds: float


def fine_tune(
    model: nn.Module | str,
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    schedule: Any,
    lora: LoraSettings,
    epochs: int,
    lr: float,
    weight_decay: float,
    max_length: int,
    batch_size: int,
    seed: int,
    normalization: str = "token",
    callbacks: Sequence[Any] = (),
    progress: bool = False,
    reference_cache_top_k: int | None = None,
    kl_scale: float = 1.0,
) -> FineTuned:
    """LoRA fine-tune ``model`` on ``rows`` on the CPU (reference: ``model`` with the adapter off) and merge the LoRA.

    Seeded with ``seed`` inside a forked RNG (LoRA initialisation, dropout and data order are
    reproducible, and the caller's RNG is left as it was). Lightning's set-up chatter is hidden
    unless ``progress``, and the warnings such short runs expect always are (see
    :func:`~lightning_safety.quiet.quiet_training`).

    Args:
        model: a Hugging Face causal LM or a name / folder for :class:`~lightning_safety.module.SafeFineTuning`;
            a given module is changed in place (LoRA injection and merging): pass a copy to keep it.
        rows: ``{"id", "prompt", "response", ...}`` chat SFT rows; a row's ``system`` field, where
            any row has one, is its system prompt.
        tokenizer: the model's tokenizer (with a chat template).
        schedule: the beta schedule (``ConstantBeta(0.0)``: plain SFT, the reference is never run).
        lora: the adapter trained (a copy is used).
        epochs: passes over the rows.
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        max_length: tokens per row (longer rows lose their end).
        batch_size: rows per optimizer step.
        seed: the seed of the run and of the data order.
        normalization: the loss's batch average, ``token`` or ``example`` (see ``SafeFineTuning``).
        callbacks: Lightning callbacks for the run (risk estimation, drift control, ...).
        progress: Lightning's progress bar.
        reference_cache_top_k: run the reference once over the rows before training and read its
            top-k log-probabilities from a reference cache at every step (None: run it every step).
            Its time counts in ``seconds``.
        kl_scale: the factor on the KL term (see ``SafeFineTuning``).
    """
    # Imported here: Lightning costs seconds, and ``lightning-safety --help`` imports the experiments.
    import lightning as L

    from lightning_safety.data.datamodule import ChatSFTDataModule
    from lightning_safety.module import SafeFineTuning

    with torch.random.fork_rng(devices=[]), quiet_training(not progress):
        torch.manual_seed(seed)
        fields = FieldMap(system="system") if any(row.get("system") for row in rows) else FieldMap()
        data = ChatSFTDataModule(train=list(rows), tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                                 seed=seed, fields=fields)
        module = SafeFineTuning(
            model,
            lora=replace(lora),
            reference="adapter_disabled",  # one copy of the weights; with beta = 0 it is never run
            schedule=schedule,
            normalization=normalization,
            kl_scale=kl_scale,
            optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
        )
        with tempfile.TemporaryDirectory(prefix="lightning-safety-finetune-") as root:
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                log_every_n_steps=1,
                gradient_clip_val=1.0,  # a high lr on a handful of rows must not blow up a step
                default_root_dir=root, callbacks=list(callbacks),
            )
            started = time.perf_counter()
            if reference_cache_top_k is not None:
                module.configure_model()
                with torch.random.fork_rng(devices=[]):  # the pass over the data must not move the run's RNG
                    data.setup("fit")
                    cache = module.precompute_reference(data.train_dataloader(), f"{root}/reference_cache",
                                                        top_k=reference_cache_top_k)
                module.use_reference_cache(cache)
            trainer.fit(module, datamodule=data)
            seconds = time.perf_counter() - started
    merged = module.policy.merge_and_unload()
    merged.eval()
    return FineTuned(model=merged, steps=int(trainer.global_step), seconds=seconds)
