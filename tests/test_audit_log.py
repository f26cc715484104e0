"""RiskAuditLog: one row per example seen, values from the step's outputs, crash-safe files, resumes, DDP."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scripts import run_script
from transformers import AutoModelForCausalLM

from lightning_safety.callbacks.audit import AUDIT_COLUMNS, RiskAuditLog, read_audit_log
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.errors import LightningSafetyError
from lightning_safety.schedules import ThresholdRiskSchedule
from lightning_safety.module import SafeFineTuning

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = REPO_ROOT / "configs" / "data" / "tiny_chat.jsonl"
# beta = 0 below the threshold: the reference is skipped for the data's 0.05-risk rows, and KL is
# measured on its 0.95-risk rows only. (A linear schedule from 0 would give 0.05 a beta of 0.045.)
SCHEDULE = ThresholdRiskSchedule(threshold=0.5, beta_low=0.0, beta_high=0.9)


class Seen(L.Callback):
    """What each training batch held, as the trainer gave it to callbacks."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "id": list(batch["id"]),
                "risk": batch["risk"].tolist(),
                "tokens": (batch["labels"] != -100).sum(dim=1).tolist(),
            }
        )


class FailAt(L.Callback):
    """Fault injection: raise when the batch with this index starts."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            raise RuntimeError("injected failure")


def tiny_data(model_dir: Path, batch_size: int = 4) -> ChatSFTDataModule:
    return ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(model_dir), batch_size=batch_size, max_length=256, seed=0)


def fit(model_dir: Path, callbacks: list, *, max_steps: int, module=None, ckpt_path=None, root=None, **trainer_kwargs):
    L.seed_everything(0)
    if module is None:
        module = SafeFineTuning(
            str(model_dir),
            reference="model_copy",
            schedule=SCHEDULE,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        )
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=tiny_data(model_dir), ckpt_path=ckpt_path)
    return trainer, module


def expected_rows(seen: Seen) -> list[dict]:
    """Per example: (step, epoch, batch_idx, id, risk, tokens) as the batches held them."""
    return [
        {"step": b["step"], "epoch": b["epoch"], "batch_idx": b["batch_idx"], "id": i, "risk": r, "tokens": t}
        for b in seen.batches
        for i, r, t in zip(b["id"], b["risk"], b["tokens"])
    ]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_returns_the_per_example_contract(tiny_model_dir):
    module = SafeFineTuning(str(tiny_model_dir), reference="model_copy", schedule=SCHEDULE)
    module.configure_model()
    data = tiny_data(tiny_model_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = module.training_step(batch, 0)
    assert set(out) == {"loss", "risk", "beta", "kl", "nll", "tokens"}
    assert out["loss"].dim() == 0 and out["loss"].requires_grad
    size = batch["input_ids"].shape[0]
    for key in ("risk", "beta", "kl", "nll", "tokens"):
        assert out[key].shape == (size,) and not out[key].requires_grad, key
    torch.testing.assert_close(out["risk"], batch["risk"])
    torch.testing.assert_close(out["beta"], SCHEDULE(batch["risk"]))
    assert out["tokens"].tolist() == (batch["labels"] != -100).sum(dim=1).tolist()


def test_rows_match_the_batches_and_the_schedule_in_jsonl_and_csv(tiny_model_dir, tmp_path):
    seen = Seen()
    jsonl, csv = RiskAuditLog(tmp_path / "logs" / "audit.jsonl"), RiskAuditLog(tmp_path / "logs" / "audit.csv")
    # 24 rows, batch 4: 6 steps per epoch, so step 7 is in the second epoch.
    fit(tiny_model_dir, [seen, jsonl, csv], max_steps=8)
    rows = read_audit_log(tmp_path / "logs" / "audit.jsonl")
    expected = expected_rows(seen)
    assert len(rows) == len(expected) == 32
    assert jsonl.rows_written == 32
    assert [list(row) for row in rows] == [list(AUDIT_COLUMNS)] * len(rows)
    for row, want in zip(rows, expected):
        assert {key: row[key] for key in want} == pytest.approx(want), row
        assert row["rank"] == 0
        assert row["regularized"] == (row["beta"] > 0)
        assert row["beta"] == pytest.approx(float(SCHEDULE(torch.tensor([row["risk"]]))[0]))
        assert row["nll"] > 0
        if not row["regularized"]:
            assert row["kl"] == 0.0  # the reference was skipped for this row
        elif row["step"] > 0:  # at step 0 the policy is still the reference
            assert row["kl"] > 0
    assert {row["epoch"] for row in rows} == {0, 1}
    assert sum(row["regularized"] for row in rows) == sum(r >= 0.5 for b in seen.batches for r in b["risk"]) > 0
    assert any(row["risk"] == 0.05 for row in rows)  # float32 values are written as the short decimal

    # The CSV holds the same rows, typed the same way, under one header.
    assert read_audit_log(tmp_path / "logs" / "audit.csv") == rows
    lines = (tmp_path / "logs" / "audit.csv").read_text().splitlines()
    assert lines[0] == ",".join(AUDIT_COLUMNS) and len(lines) == 33


def test_gradient_accumulation_gives_one_row_per_example_per_micro_batch(tiny_model_dir, tmp_path):
    seen = Seen()
    fit(tiny_model_dir, [seen, RiskAuditLog(tmp_path / "audit.jsonl")], max_steps=2, accumulate_grad_batches=2)
    rows = read_audit_log(tmp_path / "audit.jsonl")
    assert len(rows) == 16
    assert [row["id"] for row in rows] == [row["id"] for row in expected_rows(seen)]
    # Micro-batches 0 and 1 make optimizer step 0, micro-batches 2 and 3 step 1.
    assert [(row["batch_idx"], row["step"]) for row in rows[::4]] == [(0, 0), (1, 0), (2, 1), (3, 1)]


class PlainModule(L.LightningModule):
    """Not SafeFineTuning: an HF causal LM trained on the batch's labels, returning what it is told."""

    def __init__(self, model_dir: Path, returns: str) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).train()
        self.returns = returns

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        if self.returns == "loss":
            return loss
        return {"loss": loss, "kl": loss.detach(), "beta": torch.zeros(3)}  # aggregates, not [B] values

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("returns", ["loss", "aggregates"])
def test_any_lightning_module_gets_id_and_risk_from_the_batch_and_nulls_elsewhere(tiny_model_dir, tmp_path, returns):
    seen = Seen()
    log = RiskAuditLog(tmp_path / "audit.jsonl")
    if returns == "loss":
        fit(tiny_model_dir, [seen, log], max_steps=2, module=PlainModule(tiny_model_dir, returns))
    else:
        with pytest.warns(UserWarning, match=r"outputs\['kl'\] is not one value per example"):
            fit(tiny_model_dir, [seen, log], max_steps=2, module=PlainModule(tiny_model_dir, returns))
    rows = read_audit_log(tmp_path / "audit.jsonl")
    expected = expected_rows(seen)
    assert len(rows) == len(expected) == 8
    for row, want in zip(rows, expected):
        assert (row["id"], row["step"]) == (want["id"], want["step"])
        assert row["risk"] == pytest.approx(want["risk"])
        assert {key: row[key] for key in ("beta", "kl", "nll", "tokens", "regularized")} == dict.fromkeys(
            ("beta", "kl", "nll", "tokens", "regularized")
        )
    assert '"kl": null' in (tmp_path / "audit.jsonl").read_text()


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_crash_keeps_every_completed_batch_and_a_resume_repairs_the_tail(tiny_model_dir, tmp_path, suffix):
    path = tmp_path / f"audit.{suffix}"
    checkpoints = tmp_path / "checkpoints"
    seen = Seen()

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=2, save_top_k=-1, filename="{step}")

    with pytest.raises(RuntimeError, match="injected failure"):
        fit(tiny_model_dir, [seen, RiskAuditLog(path), FailAt(batch_idx=3), checkpoint()], max_steps=6, root=tmp_path)
    rows = read_audit_log(path)
    assert len(rows) == 12  # batches 0, 1, 2 completed; batch 3 never ran
    assert [row["id"] for row in rows] == [row["id"] for row in expected_rows(seen)[:12]]

    # A crash in the middle of a write leaves part of a line: readers skip it, a resume cuts it.
    with open(path, "ab") as handle:
        handle.write(b'{"step": 3, "epoch": 0, "batch_idx": 3, "id": "trunc' if suffix == "jsonl" else b"3,0,3,0,trunc")
    with pytest.warns(UserWarning, match="skipped an incomplete last line"):
        assert read_audit_log(path) == rows

    resumed = Seen()
    with pytest.warns(UserWarning) as caught:
        fit(tiny_model_dir, [resumed, RiskAuditLog(path), checkpoint()], max_steps=5, ckpt_path=checkpoints / "step=2.ckpt")
    messages = [str(w.message) for w in caught]
    assert any("removed an incomplete last line" in m for m in messages)
    assert any("replayed steps are logged again" in m for m in messages)  # step 2 ran before the crash too
    text = path.read_text()
    assert "trunc" not in text and text.endswith("\n")
    if suffix == "csv":
        assert text.count("step,epoch") == 1
    after = read_audit_log(path)
    assert after[:12] == rows
    assert [(row["step"], row["id"]) for row in after[12:]] == [(r["step"], r["id"]) for r in expected_rows(resumed)]
    assert [row["step"] for row in after[::4]] == [0, 1, 2, 2, 3, 4]
    # The replayed step saw the same examples (the data loader resumes mid-epoch).
    assert [row["id"] for row in after[8:12]] == [row["id"] for row in after[12:16]]


def test_a_fresh_fit_refuses_an_existing_log_unless_told_to_overwrite(tiny_model_dir, tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old": 1}\n')
    with pytest.raises(LightningSafetyError, match="already exists and is not empty: pass overwrite=True") as error:
        fit(tiny_model_dir, [RiskAuditLog(path)], max_steps=1)
    assert "\n" not in str(error.value)
    assert path.read_text() == '{"old": 1}\n'

    log = RiskAuditLog(path, overwrite=True)
    fit(tiny_model_dir, [log], max_steps=1)
    assert "old" not in path.read_text() and len(read_audit_log(path)) == 4
    # The same callback in a later fit of this process continues the file it wrote.
    fit(tiny_model_dir, [log], max_steps=1)
    assert len(read_audit_log(path)) == 8

    empty = tmp_path / "empty.csv"
    empty.touch()
    fit(tiny_model_dir, [RiskAuditLog(empty)], max_steps=1)
    assert len(read_audit_log(empty)) == 4


def test_bad_arguments_and_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(LightningSafetyError, match=r"use a \.jsonl or \.csv path"):
        RiskAuditLog(tmp_path / "audit.txt")
    with pytest.raises(LightningSafetyError, match="format must be 'jsonl' or 'csv'"):
        RiskAuditLog(tmp_path / "audit.jsonl", format="parquet")
    with pytest.raises(LightningSafetyError, match="overwrite must be True or False"):
        RiskAuditLog(tmp_path / "audit.jsonl", overwrite="yes")
    assert RiskAuditLog(tmp_path / "audit.log", format="csv").format == "csv"
    assert RiskAuditLog(tmp_path / "AUDIT.JSONL").format == "jsonl"

    log = RiskAuditLog(tmp_path / "runs" / "audit.jsonl")
    assert log.rank_path(0, 1) == tmp_path / "runs" / "audit.jsonl"
    assert log.rank_path(1, 2) == tmp_path / "runs" / "audit.rank1.jsonl"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(LightningSafetyError, match="bad.jsonl line 2 is not valid JSON"):
        read_audit_log(bad)
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes('{"id": "é"}\n{"id": "é'.encode()[:-1])  # a crash split the last character
    assert read_audit_log(partial) == [{"id": "é"}]
    with pytest.raises(LightningSafetyError, match="not found"):
        read_audit_log(tmp_path / "missing.csv")


DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import lightning as L
    import torch
    from lightning_safety.callbacks.audit import RiskAuditLog
    from lightning_safety.data import ChatSFTDataModule
    from lightning_safety.errors import LightningSafetyError
    from lightning_safety.module import SafeFineTuning

    out, model_dir, data_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def fit(log, max_steps):
        L.seed_everything(0)
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[log],
        )
        data = ChatSFTDataModule(train=data_file, tokenizer=model_dir, batch_size=3, max_length=256, seed=0)
        trainer.fit(SafeFineTuning(model_dir, reference="model_copy"), datamodule=data)
        return trainer

    trainer = fit(RiskAuditLog(out / "audit.jsonl"), max_steps=2)
    rank = trainer.global_rank
    # Only rank 1's file is left: both ranks must refuse the fresh fit, or rank 0 would wait forever.
    if rank == 0:
        (out / "audit.rank0.jsonl").rename(out / "first.rank0.jsonl")
    trainer.strategy.barrier()
    try:
        fit(RiskAuditLog(out / "audit.jsonl"), max_steps=1)
        error = None
    except LightningSafetyError as caught:
        error = str(caught)
    (out / f"result{rank}.json").write_text(json.dumps({"error": error}))
    # Tear the process group down on both ranks before exit: left to interpreter shutdown, gloo's
    # threads can be destroyed while joinable and abort the process ("terminate called ...").
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()
    """
)


def test_ddp_ranks_write_their_own_files_and_refuse_together(tiny_model_dir, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    rank1 = out / "audit.rank1.jsonl"
    run_script(worker, out, tiny_model_dir, TINY_DATA, timeout=300)
    assert not (out / "audit.jsonl").exists() and not (out / "audit.rank0.jsonl").exists()
    # Rank 1's file from the first fit is left untouched by the refused one.
    ranks = [read_audit_log(out / "first.rank0.jsonl"), read_audit_log(rank1)]
    for rank, rows in enumerate(ranks):
        assert len(rows) == 6 and {row["rank"] for row in rows} == {rank}
        assert [row["step"] for row in rows] == [0, 0, 0, 1, 1, 1]
        assert all(row["regularized"] == (row["beta"] > 0) and row["tokens"] > 0 for row in rows)
    assert {row["id"] for row in ranks[0]}.isdisjoint(row["id"] for row in ranks[1])
    results = [json.loads((out / f"result{rank}.json").read_text()) for rank in (0, 1)]
    assert "another rank could not open its audit log" in results[0]["error"]
    assert "audit.rank1.jsonl already exists and is not empty" in results[1]["error"]
