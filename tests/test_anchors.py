"""Refusal anchors: the reference's own refusals, plain and wrapped, and nothing it answered."""

from __future__ import annotations

import json

import pytest

from lightning_safety.anchors import answer_anchors, refusal_anchors
from lightning_safety.cli import run_cli
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.demo_data import add_wrapped_copies, load_demo_prompts
from lightning_safety.errors import DataError
from lightning_safety.evaluation.generation import GenerationSettings
from lightning_safety.models import load_causal_lm, load_tokenizer

GENERATION = GenerationSettings(max_new_tokens=4)


class EveryOther:
    """A refusal detector that takes every other response it sees for a refusal (the tiny model refuses nothing)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def is_refusal(self, response: str) -> bool:
        self.seen.append(response)
        return len(self.seen) % 2 == 0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_anchors_keep_only_refusals_plain_first_then_wrapped(tiny):
    prompts = load_demo_prompts("harmful")[:12]
    detector = EveryOther()
    rows = refusal_anchors(*tiny, prompts, count=3, generation=GENERATION, detector=detector)
    assert len(rows) == 6 and all(row["anchor"] for row in rows)
    plain, wrapped = rows[:3], rows[3:]
    # Every other request was "answered": the anchors are the 2nd, 4th, 6th of each kind, never the others.
    assert [r["prompt"] for r in plain] == [prompts[1], prompts[3], prompts[5]]
    copies = add_wrapped_copies(prompts)[len(prompts):]
    assert [r["prompt"] for r in wrapped] == [copies[1], copies[3], copies[5]]
    assert len({r["id"] for r in rows}) == 6
    # The response is the model's own greedy answer to the request.
    again = refusal_anchors(*tiny, prompts, count=3, generation=GENERATION, detector=EveryOther())
    assert [r["response"] for r in again] == [r["response"] for r in rows]


def test_plain_only_and_too_few_refusals_fail_in_one_line(tiny):
    prompts = load_demo_prompts("harmful")[:6]
    rows = refusal_anchors(*tiny, prompts, count=2, wrapped=False, generation=GENERATION, detector=EveryOther())
    assert [r["prompt"] for r in rows] == [prompts[1], prompts[3]]
    # The tiny random model refuses nothing under the default keyword detector: fail closed, no partial anchors.
    with pytest.raises(DataError, match=r"refused only 0 of 6 plain requests.*lower count"):
        refusal_anchors(*tiny, prompts, count=2, generation=GENERATION)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="count="):
            refusal_anchors(*tiny, prompts, count=bad)
    with pytest.raises(DataError, match="no prompts"):
        refusal_anchors(*tiny, ["", "  "], count=1)



def test_answer_anchors_keep_only_answers(tiny):
    prompts = load_demo_prompts("borderline")[:8]
    rows = answer_anchors(*tiny, prompts, count=3, generation=GENERATION, detector=EveryOther())
    # EveryOther takes the 2nd, 4th, ... response for a refusal: the answers kept are the 1st, 3rd, 5th.
    assert [r["prompt"] for r in rows] == [prompts[0], prompts[2], prompts[4]]
    assert {r["anchor"] for r in rows} == {"answer"}
    with pytest.raises(DataError, match="answered only 4 of 8 requests"):
        answer_anchors(*tiny, prompts, count=5, generation=GENERATION, detector=EveryOther())


def _rows(count: int, **extra) -> list[dict]:
    return [{"prompt": f"Summarise note {i}.", "response": f"Note {i} in short.", **extra} for i in range(count)]


def _anchor_file(path, count: int = 2):
    path.write_text("".join(
        json.dumps({"id": f"anchor-{i}", "prompt": f"Harmful request {i}", "response": "I can't help with that.",
                    "anchor": True}) + "\n" for i in range(count)))
    return str(path)


def test_datamodule_appends_anchors_after_the_mix_at_full_risk(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    anchors = _anchor_file(tmp_path / "anchors.jsonl")
    data = ChatSFTDataModule(train=_rows(6, risk=0.0, is_harmful=False), harmful=_rows(4, risk=0.5, is_harmful=True),
                             harmful_fraction=0.5, mix_size=4, anchors=anchors, tokenizer=tok, batch_size=6)
    data.setup()
    assert data.train_ids[-2:] == ["anchor-0", "anchor-1"] and len(data.train_ids) == 6
    anchored = data.train_records[-2:]
    # Rows carrying risk: an anchor trains at beta_max; its request is harmful (as an estimator should find).
    assert [(r.risk, r.is_harmful) for r in anchored] == [(1.0, True), (1.0, True)]
    assert [r.messages[-1]["content"] for r in anchored] == ["I can't help with that."] * 2
    batch = next(iter(data.train_dataloader()))
    assert batch["risk"].shape == (6,) and sorted(batch["risk"].tolist())[-2:] == [1.0, 1.0]
    assert data.val_records == []


def test_anchors_leave_risk_to_the_estimator_when_rows_carry_none(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "anchors.jsonl"
    path.write_text(json.dumps({"prompt": "Harmful request", "response": "I can't.", "risk": 0.3}) + "\n")
    data = ChatSFTDataModule(train=_rows(3), anchors=str(path), tokenizer=tok, batch_size=4)
    data.setup()
    assert [(r.risk, r.is_harmful) for r in data.train_records] == [(None, None)] * 4
    assert "risk" not in next(iter(data.train_dataloader()))  # the batch stays whole for a risk callback to fill
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="data.anchors holds no rows.*lightning-safety anchors"):
        ChatSFTDataModule(train=_rows(3), anchors=str(empty), tokenizer=tok).setup()


def test_anchors_command_writes_the_refusals_whole_or_not_at_all(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import lightning_safety.evaluation.refusal as refusal

    output = tmp_path / "anchors.jsonl"
    args = ["anchors", "--model", str(tiny_model_dir), "--output", str(output), "--count", "2",
            "--max_new_tokens", "4"]
    # The tiny random model refuses nothing: the command fails in one line and writes no file.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2 and not output.exists()
    assert "refused only 0 of 120 plain requests" in capsys.readouterr().err
    # Fault injection: a detector that takes every other answer for a refusal stands in for a safe model.
    monkeypatch.setattr(refusal, "KeywordRefusal", lambda **_: EveryOther())
    run_cli(args)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    harmful = load_demo_prompts("harmful")
    assert [r["prompt"] for r in rows[:2]] == [harmful[1], harmful[3]] and len(rows) == 4
    assert all(r["anchor"] == "refusal" and r["risk"] == 1.0 and r["is_harmful"] is True and r["response"] for r in rows)
    before = output.read_text()
    with pytest.raises(SystemExit):
        run_cli(args)
    assert "exists: pass --overwrite true" in capsys.readouterr().err and output.read_text() == before
    with pytest.raises(SystemExit):
        run_cli([*args[:3], "--output", str(tmp_path / "anchors.csv")])
    assert "does not end in .jsonl" in capsys.readouterr().err
    # What the command wrote is what a recipe's data.anchors reads.
    data = ChatSFTDataModule(train=_rows(2), anchors=str(output), tokenizer=load_tokenizer(str(tiny_model_dir)))
    data.setup()
    assert data.train_ids[2:] == [r["id"] for r in rows]



def test_a_recipe_reads_its_anchors_through_the_cli(tmp_path, monkeypatch):
    import math
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    anchors = _anchor_file(tmp_path / "anchors.jsonl", count=3)
    cli = run_cli(["fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.max_epochs", "1", "--trainer.max_steps", "-1", "--data.anchors", anchors])
    data = cli.datamodule
    assert data.train_ids[-3:] == ["anchor-0", "anchor-1", "anchor-2"]
    assert [r.risk for r in data.train_records[-3:]] == [1.0] * 3  # tiny_chat.jsonl carries a risk column
    assert cli.trainer.global_step == math.ceil(len(data.train_ids) / data.batch_size)
