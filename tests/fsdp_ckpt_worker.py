"""Worker for tests/test_fsdp.py: FSDP2 (ModelParallelStrategy, CPU/gloo) checkpoints, save and resume.

Run as ``python tests/fsdp_ckpt_worker.py OUT_DIR MODEL_DIR {first,resume,straight} {sharded,full}``:
``first`` trains 4 steps saving a checkpoint every 2, ``resume`` continues the step-4 checkpoint to
step 6, ``straight`` trains 6 steps at once. Rank 0 saves the policy's full weights at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_safety.data import ChatSFTDataModule
from lightning_safety.module import SafeFineTuning

TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"


def main(out: Path, model_dir: str, phase: str, kind: str) -> None:
    L.seed_everything(0)
    module = SafeFineTuning(model_dir, reference="model_copy", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=model_dir, batch_size=3, max_length=256, seed=0)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=kind == "sharded")
    saving = ModelCheckpoint(dirpath=out / f"{kind}_ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=4 if phase == "first" else 6, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[saving] if phase == "first" else [],
    )
    resume = out / f"{kind}_ckpt" / "epoch=0-step=4.ckpt" if phase == "resume" else None
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    state = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.global_rank == 0:
        torch.save(state, out / f"{kind}_{phase}_weights.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
