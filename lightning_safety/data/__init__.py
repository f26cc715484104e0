"""Chat SFT data: sources, chat formatting with response-only labels, attack mixing, datamodule.

Names are imported on first use (:mod:`lightning_safety._lazy`): reading a prompt file
(:mod:`~lightning_safety.data.prompts`) does not import Lightning through the datamodule.
"""

from lightning_safety._lazy import export_names, lazy_exports

_EXPORTS = {
    "lightning_safety.data.collate": ("ChatCollator",),
    "lightning_safety.data.datamodule": ("ChatSFTDataModule",),
    "lightning_safety.data.formatting": (
        "IGNORE_INDEX", "has_chat_template", "render_ids", "resolve_pad_token_id", "tokenize_conversation",
    ),
    "lightning_safety.data.loaders": ("ResumableDataLoader", "build_eval_loader", "build_train_loader"),
    "lightning_safety.data.mixing": ("attack_mix_plan", "build_attack_mix"),
    "lightning_safety.data.padding": ("pad_batch",),
    "lightning_safety.data.records": (
        "ChatRecord", "FieldMap", "InvalidRiskError", "check_ids", "content_id", "row_messages", "row_to_record",
        "rows_to_records",
    ),
    "lightning_safety.data.sources": ("DataSource", "load_records", "load_source"),
    "lightning_safety.data.tokenized": ("TokenizedChatDataset", "tokenize_records"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = export_names(_EXPORTS)
