"""Data: record shapes, chat formatting and labels, sources, ids, batches, attack mix, resumable loading."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_safety.data import (
    IGNORE_INDEX,
    ChatCollator,
    ChatSFTDataModule,
    DataSource,
    FieldMap,
    ResumableDataLoader,
    build_attack_mix,
    build_train_loader,
    content_id,
    load_records,
    row_messages,
    rows_to_records,
    tokenize_conversation,
    tokenize_records,
)
from lightning_safety.errors import DataError, RiskError
from lightning_safety.tiny_model import build_byte_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Like SmolLM2's and Qwen2.5's: a default system turn when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The generation prompt says "bot" but replies render as "assistant": not prefix-stable.
UNSTABLE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>bot\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def rows(n: int, *, risk: bool = False, prefix: str = "q") -> list[dict]:
    out = []
    for i in range(n):
        row = {"prompt": f"{prefix}{i} what is {i}+{i}?", "response": f"It is {2 * i}."}
        if risk:
            row["risk"] = round(i / max(n - 1, 1), 3)
        out.append(row)
    return out


def one_line(error: pytest.ExceptionInfo, *words: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# -- record shapes ---------------------------------------------------------------------------


def test_three_record_shapes_give_the_same_tokens(tok):
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    shapes = [
        {"messages": conversation},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    encoded = [tokenize_conversation(row_messages(r), tok, max_length=256) for r in shapes]
    assert encoded[0] == encoded[1] == encoded[2]
    assert row_messages({"instruction": "Translate.", "input": "hola", "output": "hello"})[0] == {
        "role": "user",
        "content": "Translate.\n\nhola",
    }
    # ShareGPT rows and messages stored as a JSON string (a CSV cell) are the same conversation.
    sharegpt = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]
    assert row_messages({"conversations": sharegpt}, FieldMap(messages="conversations")) == conversation
    assert row_messages({"messages": json.dumps(conversation)}) == conversation


def test_field_remapping_and_system_prompts():
    fields = FieldMap(prompt="question", response="answer", system="sys", id="uid", risk="score")
    row = {"question": "Q?", "answer": "A.", "sys": "Be brief.", "uid": 7, "score": 0.25}
    (record,) = rows_to_records([row], fields)
    assert record.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    assert (record.id, record.risk) == ("7", 0.25)
    alpaca = FieldMap(instruction="task", input="context", output="solution")
    assert row_messages({"task": "Sum.", "context": "1 2", "solution": "3"}, alpaca)[1]["content"] == "3"
    # Global system prompt: added when the row has none; a row's own system field or turn wins.
    assert row_messages({"prompt": "Q", "response": "A"}, system_prompt="G")[0] == {"role": "system", "content": "G"}
    assert row_messages(row, fields, system_prompt="G")[0]["content"] == "Be brief."
    own = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    assert row_messages(own, system_prompt="G")[0]["content"] == "S"


# -- labels ----------------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_tokens_and_end_token(tok):
    messages = row_messages({"prompt": "Hi there", "response": "Hello! How can I help?"}, system_prompt="Be nice.")
    out = tokenize_conversation(messages, tok, max_length=512)
    ids, labels, start = out["input_ids"], out["labels"], out["prompt_length"]
    prefix = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids[:start]) == prefix  # the probe's pre-generation prompt, header included
    assert labels[:start] == [IGNORE_INDEX] * start
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labelled == list(range(start, labelled[-1] + 1))  # one contiguous span from prompt_length
    assert all(labels[i] == ids[i] for i in labelled)
    assert tok.decode([ids[i] for i in labelled]) == "Hello! How can I help?<|im_end|>"
    assert ids[labelled[-1]] == tok.convert_tokens_to_ids("<|im_end|>")
    assert labels[labelled[-1] + 1 :] == [IGNORE_INDEX] * (len(ids) - labelled[-1] - 1)  # ChatML's trailing "\n"
    assert out["truncated"] is False


def test_multi_turn_labels_each_assistant_turn(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    out = tokenize_conversation(messages, tok, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["first<|im_end|>", "second<|im_end|>"]
    assert tok.decode(ids[: out["prompt_length"]]).endswith("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n")


def test_default_system_template_and_override(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    out = tokenize_conversation(messages, tok, max_length=512, chat_template=DEFAULT_SYSTEM_TEMPLATE)
    assert tok.decode(out["input_ids"][: out["prompt_length"]]).startswith("<|im_start|>system\nYou are a helpful")
    assert tok.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == "Yo<|im_end|>"
    plain = tokenize_conversation(messages, tok, max_length=512)
    assert len(out["input_ids"]) > len(plain["input_ids"])  # the argument overrides the tokenizer's template
    # A tokenizer without a template works when one is given.
    bare = build_byte_tokenizer(chat_template=None)
    assert tokenize_conversation(messages, bare, max_length=512, chat_template=DEFAULT_SYSTEM_TEMPLATE) == out
    with pytest.raises(DataError) as error:
        tokenize_conversation(messages, tok, max_length=512, chat_template=UNSTABLE_TEMPLATE)
    one_line(error, "prefix-stable", "chat_template")


def test_truncation_keeps_the_prompt_and_cuts_the_response_end(tok):
    messages = row_messages({"prompt": "Short prompt.", "response": "x" * 300})
    full = tokenize_conversation(messages, tok, max_length=1000)
    cut = tokenize_conversation(messages, tok, max_length=100)
    assert cut["truncated"] and len(cut["input_ids"]) == 100
    assert cut["input_ids"] == full["input_ids"][:100] and cut["labels"] == full["labels"][:100]
    assert cut["prompt_length"] == full["prompt_length"]


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, words",
    [
        ({"prompt": "Q", "response": ""}, ["row 3", "no response", "'response'"]),
        ({"prompt": "Q", "response": None, "id": "ab12"}, ["row 3 (id ab12)", "no response"]),
        ({"prompt": "Q"}, ["row 3", "no response", "missing or empty"]),
        ({"instruction": "Q", "output": "  "}, ["row 3", "no response", "'output'"]),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
         ["row 3", "no response", "assistant"]),
        ({"question": "Q", "answer": "A"}, ["row 3", "data.fields", "question"]),
        ({"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]},
         ["row 3", "role 'robot'", "system, user, assistant"]),
    ],
    ids=["empty", "none-with-id", "missing", "alpaca", "messages", "unknown-fields", "unknown-role"],
)
def test_row_without_response_is_a_one_line_error(row, words):
    with pytest.raises(DataError) as error:
        rows_to_records([*rows(3), row])
    one_line(error, *words)


def test_response_truncated_away_entirely(tok):
    records = rows_to_records([*rows(5), {"prompt": "p" * 600, "response": "ok", "id": "long"}])
    with pytest.raises(DataError) as error:
        tokenize_records(records, tok, max_length=512)
    one_line(error, "row 5 (id long)", "truncated away entirely", "max_length 512", "data.max_length")


def test_tokenizer_without_chat_template(tmp_path):
    bare = build_byte_tokenizer(chat_template=None)
    with pytest.raises(DataError) as error:
        tokenize_conversation(row_messages(rows(1)[0]), bare, max_length=64)
    one_line(error, "no chat template", "data.chat_template")
    data = ChatSFTDataModule(train=rows(4), tokenizer=bare)
    with pytest.raises(DataError) as error:
        data.setup()
    one_line(error, "no chat template")


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.1, "high"])
def test_bad_risk_values(value):
    data = rows(4, risk=True)
    data[2]["risk"] = value
    with pytest.raises(DataError) as error:
        rows_to_records(data)
    assert isinstance(error.value, RiskError)  # also catchable as a risk error
    one_line(error, "row 2", "'risk'", "[0, 1]")


def test_risk_on_some_rows_only(tok):
    data = rows(4, risk=True)
    del data[1]["risk"]
    with pytest.raises(DataError) as error:
        tokenize_records(rows_to_records(data), tok, max_length=128)
    one_line(error, "row 1", "risk", "every row")


def test_missing_file_and_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(DataError) as error:
        load_records(str(tmp_path / "nope.jsonl"))
    one_line(error, "not found", "nope.jsonl")
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(DataError) as error:
        load_records(str(tmp_path / "rows.txt"))
    one_line(error, "unsupported", ".jsonl")
    # A hub name offline: one line naming the dataset and the way out (offline mode fails at once).
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        load_records("someone/no-such-dataset")
    one_line(error, "someone/no-such-dataset", "local file")


def test_duplicate_explicit_ids_with_different_content():
    with pytest.raises(DataError) as error:
        rows_to_records([{**rows(1)[0], "id": 1}, {**rows(2)[1], "id": 1}])
    one_line(error, "id '1'", "rows 0 and 1", "unique")


# -- sources and ids -------------------------------------------------------------------------


def test_files_of_every_type_and_lists_load_to_the_same_records(tmp_path):
    data = [
        {"id": i, "prompt": f"Say {i}, \"quoted\"", "response": f"{i}!", "risk": i / 4, "is_harmful": i % 2 == 1}
        for i in range(5)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "d.json").write_text(json.dumps(data))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    header = "\t".join(data[0])
    lines = ["\t".join(str(v) for v in r.values()) for r in data]  # TSV: no quoting, '"' is text
    (tmp_path / "d.tsv").write_text("\n".join([header, *lines]) + "\n")
    pd.DataFrame(data).to_parquet(tmp_path / "d.parquet")
    expected = rows_to_records(data)
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet"):
        assert rows_to_records(load_records(str(tmp_path / name))) == expected, name
    assert load_records(data, limit=2) == data[:2]
    assert len(load_records(str(tmp_path / "d.parquet"), limit=3)) == 3


def test_ids_are_stable_content_hashes_unless_given():
    row = {"prompt": "Q", "response": "A"}
    first, again = rows_to_records([row]), rows_to_records([dict(row)])
    assert first[0].id == again[0].id and len(first[0].id) == 16
    # Reproducible anywhere: sha256 of the canonical JSON of the messages (no per-process salt).
    canonical = json.dumps(first[0].messages, sort_keys=True, ensure_ascii=False)
    assert first[0].id == hashlib.sha256(canonical.encode()).hexdigest()[:16] == content_id(first[0].messages)
    assert rows_to_records([{**row, "response": "B"}])[0].id != first[0].id
    assert rows_to_records([row], system_prompt="S")[0].id != first[0].id
    assert rows_to_records([{**row, "id": "my-id"}])[0].id == "my-id"


# -- batches ---------------------------------------------------------------------------------


def test_collated_batch_fields_dtypes_and_padding(tok):
    data = [{**r, "is_harmful": i == 1, "id": f"r{i}"} for i, r in enumerate(rows(3, risk=True))]
    data[2]["response"] = "A much longer answer than the others."
    dataset = tokenize_records(rows_to_records(data), tok, max_length=256)
    batch = ChatCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)([dataset[i] for i in range(3)])
    lengths = [len(dataset[i]["input_ids"]) for i in range(3)]
    size, width = batch["input_ids"].shape
    assert size == 3 and width % 8 == 0 and width >= max(lengths)
    for key in ("input_ids", "attention_mask", "labels", "prompt_length", "index"):
        assert batch[key].dtype == torch.long, key
    assert batch["risk"].dtype == torch.float32 and batch["is_harmful"].dtype == torch.bool
    torch.testing.assert_close(batch["risk"], torch.tensor([0.0, 0.5, 1.0]))
    assert batch["is_harmful"].tolist() == [False, True, False] and batch["id"] == ["r0", "r1", "r2"]
    assert batch["index"].tolist() == [0, 1, 2]
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert (batch["input_ids"][row, length:] == tok.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        start = int(batch["prompt_length"][row])
        assert batch["labels"][row, :start].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, start] == batch["input_ids"][row, start] != IGNORE_INDEX
    plain = ChatCollator(pad_token_id=0)([tokenize_records(rows_to_records(rows(1)), tok, max_length=64)[0]])
    assert "risk" not in plain and "is_harmful" not in plain


# -- attack mix ------------------------------------------------------------------------------


def test_attack_mix_sizes_marks_and_determinism():
    benign, harmful = rows(40, prefix="b"), rows(10, prefix="h")
    mix = build_attack_mix(benign, harmful, harmful_fraction=0.25, seed=1)
    assert len(mix) == 40 and sum(r["is_harmful"] for r in mix) == 10
    assert all(r["prompt"].startswith("h") == r["is_harmful"] for r in mix)
    assert len({r["prompt"] for r in mix}) == 40  # without replacement
    assert mix == build_attack_mix(benign, harmful, harmful_fraction=0.25, seed=1)
    assert mix != build_attack_mix(benign, harmful, harmful_fraction=0.25, seed=2)
    assert "is_harmful" not in benign[0]  # inputs untouched
    small = build_attack_mix(benign, harmful, harmful_fraction=0.1, size=20, seed=0)
    assert len(small) == 20 and sum(r["is_harmful"] for r in small) == 2
    assert not any(r["is_harmful"] for r in build_attack_mix(benign, harmful, harmful_fraction=0.0))
    with pytest.raises(DataError) as error:
        build_attack_mix(benign, harmful, harmful_fraction=0.5)
    one_line(error, "20 harmful rows", "has 10")
    with pytest.raises(DataError) as error:
        build_attack_mix(benign, harmful, harmful_fraction=1.5)
    one_line(error, "harmful_fraction", "[0, 1]")


def test_attack_mix_of_advbench_and_alpaca(tok):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} not found (it sits beside the repository)")
    harmful = load_records(str(SHARED_DATA / "advbench_harmful_behaviors.csv"), limit=20)
    alpaca = load_records(str(SHARED_DATA / "alpaca_instructions.jsonl"), limit=20)
    benign = [{**row, "output": "Here is a helpful answer."} for row in alpaca]  # the file holds prompts only
    mix = build_attack_mix(benign, harmful, harmful_fraction=0.2, seed=0)
    records = rows_to_records(mix, FieldMap(prompt="goal", response="target"))
    assert len(records) == 20 and sum(r.is_harmful for r in records) == 4
    harmful_users = {r.messages[0]["content"] for r in records if r.is_harmful}
    assert harmful_users <= {row["goal"] for row in harmful}
    batch = ChatCollator(tok.pad_token_id)([tokenize_records(records, tok, max_length=512)[i] for i in range(20)])
    assert batch["is_harmful"].sum() == 4


# -- resumable loading -----------------------------------------------------------------------


def batches_of(loader) -> list[list[str]]:
    return [batch["id"] for batch in loader]


@pytest.fixture(scope="module")
def dataset(tok):
    return tokenize_records(rows_to_records(rows(23)), tok, max_length=128)


def loader_for(dataset, tok, **kwargs) -> ResumableDataLoader:
    return build_train_loader(dataset, batch_size=4, collate_fn=ChatCollator(tok.pad_token_id), seed=5, **kwargs)


def test_resumable_loader_continues_where_it_stopped(dataset, tok):
    full = loader_for(dataset, tok)
    full.sampler.set_epoch(1)
    expected = batches_of(full)
    assert len(expected) == 6
    interrupted = loader_for(dataset, tok)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator)["id"] for _ in range(2)]
    state = interrupted.state_dict()
    assert state["batches_yielded"] == 2 and seen == expected[:2]
    resumed = loader_for(dataset, tok)
    resumed.sampler.set_epoch(1)
    resumed.load_state_dict(state)
    assert batches_of(resumed) == expected[2:]
    assert batches_of(resumed) == expected  # the skip applies once; the next epoch starts at its beginning
    assert resumed.state_dict()["batches_yielded"] == 0  # a finished epoch is not resumed mid-way
    changed = build_train_loader(dataset, batch_size=3, collate_fn=ChatCollator(tok.pad_token_id), seed=5)
    with pytest.raises(DataError) as error:
        changed.load_state_dict(state)
    one_line(error, "cannot resume mid-epoch", "batch_size")


def test_ranks_partition_the_data_and_epochs_reshuffle(dataset, tok):
    epoch0 = [batches_of(loader_for(dataset, tok, num_replicas=2, rank=r)) for r in (0, 1)]
    ids = [i for rank in epoch0 for batch in rank for i in batch]
    assert len(ids) == 24 and set(ids) == set(dataset.ids)  # 23 rows padded to 2 x 12 by one repeat
    per_rank = [{i for batch in rank for i in batch} for rank in epoch0]
    assert len(per_rank[0] & per_rank[1]) <= 1
    loader = loader_for(dataset, tok)
    loader.sampler.set_epoch(3)
    again = loader_for(dataset, tok)
    again.sampler.set_epoch(3)
    assert batches_of(loader) == batches_of(again)
    loader.sampler.set_epoch(4)
    assert batches_of(loader) != batches_of(again)


class _RecordBatches(L.LightningModule):
    """Trains nothing; keeps the ids of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["id"])
        return self.weight * batch["attention_mask"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(data, root: Path, max_steps: int, ckpt_path=None, every: int | None = None) -> _RecordBatches:
    module = _RecordBatches()
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}")]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=every is not None,
        callbacks=callbacks if every else [], default_root_dir=root, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def test_trainer_resumed_from_any_step_sees_the_uninterrupted_batches(tok, tmp_path):
    def data():
        return ChatSFTDataModule(train=rows(10), tokenizer=tok, batch_size=3, seed=3)  # 4 batches per epoch

    full = _fit(data(), tmp_path / "full", max_steps=7, every=2)
    assert len(full.seen) == 7 and full.seen[:3] != full.seen[4:7]  # epoch 1 is reshuffled
    for step in (2, 4, 6):  # mid-epoch, epoch end, mid second epoch
        checkpoint = tmp_path / "full" / f"step={step}.ckpt"
        resumed = _fit(data(), tmp_path / f"resumed{step}", max_steps=7, ckpt_path=checkpoint)
        assert resumed.seen == full.seen[step:], step


# -- datamodule ------------------------------------------------------------------------------


def test_datamodule_end_to_end(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(20, risk=True)))
    data = ChatSFTDataModule(train=str(path), tokenizer=tok, val_fraction=0.25, batch_size=4, max_length=128)
    data.setup("fit")
    data.setup("fit")  # idempotent
    assert len(data.train_records) == 15 and len(data.val_records) == 5
    assert not set(data.train_ids) & set(data.val_ids)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["risk"].dtype == torch.float32
    assert [data.train_ids[i] for i in batch["index"]] == batch["id"]
    val_batches = list(data.val_dataloader())
    assert sum(len(b["id"]) for b in val_batches) == 5
    assert isinstance(data.train_dataloader(), ResumableDataLoader)
    assert ChatSFTDataModule(train=rows(4), tokenizer=tok).val_dataloader() == []


def test_empty_training_file_is_named_in_the_error(tok, tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as error:
        ChatSFTDataModule(train=str(empty), tokenizer=tok).train_dataloader()
    one_line(error, str(empty), "holds no rows")
    with pytest.raises(DataError, match="no training data: set data.train"):
        ChatSFTDataModule(tokenizer=tok).train_dataloader()


def test_datamodule_attack_mix_with_a_source_of_its_own_fields(tok, tmp_path):
    path = tmp_path / "harmful.csv"
    pd.DataFrame([{"goal": f"bad {i}", "target": f"Sure, {i}", "id": i} for i in range(6)]).to_csv(path, index=False)
    benign = [{**r, "id": i} for i, r in enumerate(rows(12))]  # ids 0.. in both sources: kept apart below
    harmful = DataSource(path=str(path), limit=5, fields=FieldMap(prompt="goal", response="target"))
    data = ChatSFTDataModule(train=benign, harmful=harmful, harmful_fraction=0.25, tokenizer=tok, batch_size=12)
    with pytest.raises(DataError) as error:  # benign id 1 and harmful id 1 are different conversations
        data.setup()
    one_line(error, "used by rows", "unique")
    data = ChatSFTDataModule(train=rows(12), harmful=harmful, harmful_fraction=0.25, tokenizer=tok, batch_size=12)
    batch = next(iter(data.train_dataloader()))
    assert batch["is_harmful"].sum() == 3 and len(batch["id"]) == 12
    harmful_prompts = [r.messages[0]["content"] for r in data.train_records if r.is_harmful]
    assert len(harmful_prompts) == 3 and all(p.startswith("bad ") for p in harmful_prompts)
    with pytest.raises(DataError) as error:
        ChatSFTDataModule(train=rows(4), tokenizer=tok, harmful_fraction=0.5).setup()
    one_line(error, "data.harmful")
