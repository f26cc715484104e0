"""Chat SFT data: sources, chat formatting with response-only labels, attack mixing, datamodule."""

from lightning_safety.data.collate import ChatCollator
from lightning_safety.data.datamodule import ChatSFTDataModule
from lightning_safety.data.formatting import (
    IGNORE_INDEX,
    has_chat_template,
    render_ids,
    resolve_pad_token_id,
    tokenize_conversation,
)
from lightning_safety.data.loaders import ResumableDataLoader, build_eval_loader, build_train_loader
from lightning_safety.data.mixing import attack_mix_plan, build_attack_mix
from lightning_safety.data.records import (
    ChatRecord,
    FieldMap,
    InvalidRiskError,
    check_ids,
    content_id,
    row_messages,
    row_to_record,
    rows_to_records,
)
from lightning_safety.data.sources import DataSource, load_records, load_source
from lightning_safety.data.tokenized import TokenizedChatDataset, tokenize_records

__all__ = [
    "IGNORE_INDEX",
    "ChatCollator",
    "ChatRecord",
    "ChatSFTDataModule",
    "DataSource",
    "FieldMap",
    "InvalidRiskError",
    "ResumableDataLoader",
    "TokenizedChatDataset",
    "attack_mix_plan",
    "build_attack_mix",
    "build_eval_loader",
    "build_train_loader",
    "check_ids",
    "content_id",
    "has_chat_template",
    "load_records",
    "load_source",
    "render_ids",
    "resolve_pad_token_id",
    "row_messages",
    "row_to_record",
    "rows_to_records",
    "tokenize_conversation",
    "tokenize_records",
]
