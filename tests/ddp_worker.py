"""Worker for tests/test_ddp.py: a 2-process DDP fit (gloo, CPU) that saves what each rank saw.

Run as ``python tests/ddp_worker.py OUT_DIR MODEL_DIR [NORMALIZATION [REFERENCE_CACHE]]``; Lightning's DDP launcher
starts the second rank by running this script again. With ``REFERENCE_CACHE`` (a folder written by
``SafeFineTuning.precompute_reference``) both ranks read the reference's log-probabilities from that one cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from id_hash_risk import IdHashRisk
from lightning_safety.callbacks import RiskCallback
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.module import SafeFineTuning

TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"


class RecordSteps(L.Callback):
    """Keeps the first batch this rank trained on and the logged loss of every step."""

    def __init__(self) -> None:
        self.first_batch: dict | None = None
        self.logged_losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged_losses.append(float(trainer.callback_metrics["train/loss"]))


def main(out_dir: Path, model_dir: str, normalization: str = "token", reference_cache: str | None = None) -> None:
    L.seed_everything(0)
    module = SafeFineTuning(
        model_dir,
        reference="model_copy",
        normalization=normalization,
        reference_cache=reference_cache,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=model_dir, batch_size=3, max_length=256, seed=0)
    record = RecordSteps()
    estimator = IdHashRisk()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,  # 12 rows per rank, batch 3: two epochs
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[RiskCallback(estimator), record],  # the risk is set before RecordSteps sees the batch
    )
    trainer.fit(module, datamodule=data)
    state = {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    torch.save(
        {
            "state": state,
            "first_batch": record.first_batch,
            "losses": record.logged_losses,
            "world_size": trainer.world_size,
            "scored_ids": estimator.scored_ids,
            "train_ids": data.train_ids,
            "cache_digest": None if module._cache is None else module._cache.digest,  # the cache this rank read
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    # Tear the process group down before exit (left to interpreter shutdown, gloo can abort the process).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
