"""Worker for tests/test_fsdp.py: a 2-process fit with FSDP2 (ModelParallelStrategy) or DDP, on CPU (gloo).

Run as ``python tests/fsdp_worker.py OUT_DIR MODEL_DIR PROBE_DIR CACHE_FILE {fsdp2,ddp,fsdp2-ckpt}``
(``fsdp2-ckpt``: FSDP2 with gradient checkpointing; ``fsdp2-bf16``: bf16 compute, float32 weights;
``*-lora``: LoRA, the reference is the base with the adapter disabled, one copy of the weights;
``*-sparse``: no probe, the data's risk column and
beta = 0 below risk 0.5, so some steps need no reference forward on one rank); Lightning's
launcher starts the second rank by running this script again. Rank 0 saves the trained policy's
full weights; every rank saves what it measured (shard sizes, log-prob gaps, forward counts); the
risk callback writes its cache file at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_safety.callbacks import ActivationRiskCallback
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.distributed import is_sharded, local_parameter_bytes
from lightning_safety.schedules import ThresholdRiskSchedule
from lightning_safety.models import LoraSettings
from lightning_safety.risk.hooks import find_decoder_layers
from lightning_safety.module import SafeFineTuning

TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"


def full_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters at their full (unsharded) size."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Measure(L.Callback):
    """Policy vs reference log-prob gap before steps 0 and 1, reference forwards, shard sizes."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.regularized_steps: list[bool] = []  # whether any row of this rank's batch had beta > 0
        self.losses: list[float] = []
        self.compute_dtypes: set[str] = set()  # dtype of a layer's weight while its forward runs
        self.reference_forwards = 0
        self.sizes: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        lora = pl_module.reference is None
        (pl_module.policy if lora else pl_module.reference).register_forward_pre_hook(self._count)
        linear = next(m for m in find_decoder_layers(pl_module.policy)[0].modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_pre_hook(lambda module, args: self.compute_dtypes.add(str(module.weight.dtype)))
        self.sizes["stored_dtype"] = str(linear.weight.dtype)
        for name in ("policy",) if lora else ("policy", "reference"):
            model = getattr(pl_module, name)
            self.sizes[name] = local_parameter_bytes(model) / full_bytes(model)
        self.sizes["sharded"] = float(is_sharded(pl_module.policy if lora else pl_module.reference))

    def _count(self, module, args) -> None:
        self.reference_forwards += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step > 1:
            return
        with torch.no_grad():
            policy = torch.log_softmax(pl_module(batch["input_ids"], batch["attention_mask"]).float(), dim=-1)
            if pl_module.reference is None:  # LoRA: the base with the adapter disabled
                with pl_module.policy.disable_adapter():
                    reference = pl_module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            else:
                reference = pl_module.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            reference = torch.log_softmax(reference.logits.float(), dim=-1)
        real = batch["attention_mask"].bool()
        self.gaps.append(float((policy - reference).abs()[real].max()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(pl_module.parameters())
        self.sizes["frozen_with_grad"] = float(sum(p.grad is not None for p in params if not p.requires_grad))
        self.sizes["trainable_with_grad"] = float(sum(p.grad is not None for p in params if p.requires_grad))
        self.sizes["trainable"] = float(sum(p.requires_grad for p in params))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.regularized_steps.append(bool((outputs["beta"] > 0).any()))
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main(out_dir: Path, model_dir: str, probe_dir: str, cache_file: str, mode: str) -> None:
    L.seed_everything(0)
    sparse = mode.endswith("-sparse")
    bf16 = {"param_dtype": "bfloat16", "reduce_dtype": "float32"} if mode.endswith("-bf16") else None
    lora = LoraSettings(r=4, dropout=0.0) if mode.endswith("-lora") else None
    module = SafeFineTuning(model_dir, reference="adapter_disabled" if lora else "model_copy", lora=lora,
                            gradient_checkpointing=mode.endswith("-ckpt"), sharding=bf16,
                            schedule=ThresholdRiskSchedule(0.5, beta_low=0.0, beta_high=0.9) if sparse else None,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=model_dir, batch_size=3, max_length=256, seed=0)
    sharded = mode.startswith("fsdp2")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    measure = Measure()
    risk = ActivationRiskCallback(probe_dir, cache_path=cache_file, log_stats=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=8, logger=False,  # 4 steps per epoch
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[measure] if sparse else [risk, measure],
    )
    trainer.fit(module, datamodule=data)

    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in module.policy.state_dict().items()}
    rank = trainer.global_rank
    if rank == 0:
        torch.save(state, out_dir / f"{mode}_weights.pt")
    report = {
        "world_size": trainer.world_size,
        "gaps": measure.gaps,
        "reference_forwards": measure.reference_forwards,
        "regularized_steps": measure.regularized_steps,
        "losses": measure.losses,
        "compute_dtypes": sorted(measure.compute_dtypes),
        "sizes": measure.sizes,
        "scored": risk.scored,
    }
    (out_dir / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
    # Tear the process group down before exit (left to interpreter shutdown, gloo can abort the process).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
