"""Worker for tests/test_safety_ddp.py: SafetyEvaluationCallback in a 2-process validate run (gloo, CPU).

Run as ``python tests/eval_ddp_worker.py OUT_DIR MODEL_DIR [ddp|fsdp2|fsdp2-lora]`` (fsdp2: the policy
sharded by ModelParallelStrategy; -lora: a LoRA policy, whose PEFT wrapper generates); Lightning's launcher starts the second rank by running this script again. Each rank saves what it logged and the prompts it generated for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_safety.callbacks import SafetyEvaluationCallback
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.distributed import is_sharded
from lightning_safety.evaluation import UtilityTask
from lightning_safety.models import LoraSettings
from lightning_safety.module import SafeFineTuning

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"
# 7 harmful and 5 safe prompts: uneven shares (4/3 and 3/2) on two ranks.
HARMFUL = [json.loads(line)["prompt"] for line in (DATA / "eval_harmful.jsonl").read_text().splitlines()][:7]
SAFE = [json.loads(line)["prompt"] for line in (DATA / "eval_safe.jsonl").read_text().splitlines()][:5]


def callback() -> SafetyEvaluationCallback:
    return SafetyEvaluationCallback(
        harmful=HARMFUL,
        safe=SAFE,
        utility=[UtilityTask(str(DATA / "eval_sentiment.jsonl"), task="sst2", name="sentiment", limit=7)],
        max_new_tokens=6,
        batch_size=3,
        refusal_strings=["a", "e", "o"],  # random bytes: some responses match, some do not
        progress=False,
    )


def main(out_dir: Path, model_dir: str, mode: str = "ddp") -> None:
    L.seed_everything(0)
    lora = LoraSettings(r=4, dropout=0.0) if mode.endswith("-lora") else None  # B = 0: the base model's outputs
    module = SafeFineTuning(model_dir, reference="adapter_disabled" if lora else "model_copy", lora=lora)
    data = ChatSFTDataModule(train=str(DATA / "tiny_chat.jsonl"), tokenizer=model_dir, batch_size=3, val_fraction=0.25)
    evaluation = callback()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if mode.startswith("fsdp2") else "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[evaluation])
    trainer.validate(module, datamodule=data)
    result = evaluation.last_result
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("safety/", "utility/"))}
    payload = {
        "world_size": trainer.world_size,
        "sharded": is_sharded(module.policy),
        "logged": logged,
        "totals": {name: report.total for name, report in result.rates.items()},
        "counts": {name: report.count for name, report in result.rates.items()},
        "harmful_indices": [row["index"] for row in result.samples["harmful"]],
        "safe_indices": [row["index"] for row in result.samples["safe"]],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # before exit: left to interpreter shutdown, gloo can abort


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
