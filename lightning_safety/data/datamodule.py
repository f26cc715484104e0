"""``ChatSFTDataModule``: chat SFT data from files, hub datasets or lists, ready for Lightning."""

from __future__ import annotations

import math
import os
import random
from dataclasses import replace

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_safety.data.collate import ChatCollator
from lightning_safety.data.formatting import require_chat_template, resolve_pad_token_id
from lightning_safety.data.loaders import ResumableDataLoader, build_eval_loader, build_train_loader
from lightning_safety.data.mixing import attack_mix_plan
from lightning_safety.data.records import ChatRecord, FieldMap, check_ids, rows_to_records
from lightning_safety.data.sources import DataSource, is_hub_source, load_source
from lightning_safety.data.tokenized import TokenizedChatDataset, tokenize_records
from lightning_safety.errors import DataError

SourceSpec = str | list[dict] | DataSource | None


class ChatSFTDataModule(LightningDataModule):
    """Chat fine-tuning data with response-only labels, optional attack mix and risk fields.

    Rows may be ``messages`` lists, prompt/response pairs or Alpaca instruction/input/output
    (detected per row; names via ``fields``). Each is rendered with the chat template and labelled
    on assistant tokens only (end-of-turn token included). Batches hold ``input_ids``,
    ``attention_mask``, ``labels`` [B, T], ``prompt_length`` and ``index`` [B], ``id`` (list of
    str), and ``risk`` [B] float32 / ``is_harmful`` [B] bool when the data has them.

    Truncation policy: a conversation longer than ``max_length`` tokens keeps its first
    ``max_length`` tokens; the end is dropped, so a long response is cut at its end and the
    prompt stays whole. A row whose prompt alone fills ``max_length`` (no response token left)
    is an error, not a silent empty example.

    Padding uses ``tokenizer.pad_token_id``, or ``eos_token_id`` when there is no pad token.

    Order and resuming: the train loader shuffles with a ``DistributedSampler`` seeded by
    ``seed`` (sharded by the trainer's world size and rank, Lightning sets its epoch), so an
    epoch's order depends only on (seed, epoch); it is a :class:`ResumableDataLoader`, so a run
    resumed from a mid-epoch checkpoint sees the same batches as an uninterrupted one. The
    validation loader is in order; with several devices its sampler repeats a few rows so every
    rank gets the same count (harmless for a validation loss).

    Args:
        train: Training data: a file path (.jsonl/.json/.csv/.tsv/.parquet), a hub dataset name,
            a list of row dicts, or a DataSource (path, split, name, limit, fields).
        val: Validation data, same forms as ``train``.
        harmful: Harmful rows to mix into ``train`` (the harmful fine-tuning attack setting).
        harmful_fraction: Share of harmful rows in the training mix, in [0, 1]; 0 disables it.
        mix_size: Rows in the training mix; defaults to the number of benign training rows.
        val_fraction: When ``val`` is not given, hold out this share of ``train`` for validation
            (before the attack mix, so validation stays on the benign task).
        tokenizer: Model name or path of the tokenizer (or a tokenizer object). When unset, the
            attached LightningModule's ``tokenizer`` attribute is used if it has one.
        chat_template: Jinja chat template overriding the tokenizer's own.
        system_prompt: System prompt for conversations that carry none.
        fields: Field names of the rows (see FieldMap); a DataSource's own ``fields`` win.
        max_length: Maximum tokens per example (longer ones are cut at the end).
        batch_size: Training batch size per device.
        eval_batch_size: Validation batch size per device; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: Seed of the shuffle, the attack mix and the validation hold-out.
        pad_to_multiple_of: Pad batch length up to a multiple of this.
        anchors: Refusal anchors added to the training rows after the mix, same forms as ``train``:
            the safe reference's own refusals to harmful requests the defender holds, as written by
            ``lightning-safety anchors`` (:func:`~lightning_safety.anchors.refusal_anchors`). They hold
            the model to its refusals while the task trains without a KL on every row. When the
            training rows carry a ``risk`` column, an anchor without one gets risk 1 (the schedule's
            ``beta_max``); otherwise the risk estimator scores anchors like any row. When the training
            rows carry ``is_harmful``, anchors get True (a harmful request, answered by a refusal).
    """

    def __init__(
        self,
        train: str | list[dict] | DataSource | None = None,
        val: str | list[dict] | DataSource | None = None,
        harmful: str | list[dict] | DataSource | None = None,
        harmful_fraction: float = 0.0,
        mix_size: int | None = None,
        val_fraction: float = 0.0,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        fields: FieldMap = FieldMap(),
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
        anchors: str | list[dict] | DataSource | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= harmful_fraction <= 1.0:
            raise DataError(f"harmful_fraction is {harmful_fraction}; use a number in [0, 1]")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction is {val_fraction}; use a number in [0, 1)")
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"{name} is {value}; set data.{name} to a positive number")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise DataError(f"eval_batch_size is {eval_batch_size}; set a positive number or leave it unset")
        self.train_source = train
        self.val_source = val
        self.harmful_source = harmful
        self.harmful_fraction = harmful_fraction
        self.anchors_source = anchors
        self.mix_size = mix_size
        self.val_fraction = val_fraction
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.fields = fields
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self._tokenizer_spec: str | PreTrainedTokenizerBase | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.tokenizer = tokenizer
        self.train_records: list[ChatRecord] = []
        self.val_records: list[ChatRecord] = []
        self.train_dataset: TokenizedChatDataset | None = None
        self.val_dataset: TokenizedChatDataset | None = None
        self._is_set_up = False

    # -- tokenizer ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (``lightning_safety.models.load_tokenizer`` for names)."""
        if self._tokenizer is None:
            spec = self._tokenizer_spec
            if spec is None:
                spec = getattr(getattr(self.trainer, "lightning_module", None), "tokenizer", None)
            if spec is None:
                raise DataError("no tokenizer: set data.tokenizer to the model name or path")
            if isinstance(spec, (str, os.PathLike)):
                from lightning_safety.models import load_tokenizer  # lazy: heavy, and optional here

                spec = load_tokenizer(os.fspath(spec), chat_template=self.chat_template)
            self._tokenizer = spec
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: str | PreTrainedTokenizerBase | None) -> None:
        self._tokenizer_spec = value
        self._tokenizer = None

    @property
    def collator(self) -> ChatCollator:
        """The batch collator (right padding with the pad, or eos, token)."""
        return ChatCollator(resolve_pad_token_id(self.tokenizer), self.pad_to_multiple_of)

    @property
    def train_ids(self) -> list[str]:
        """Ids of the training examples in dataset order (``batch["index"]`` indexes this list)."""
        return [record.id for record in self.train_records]

    @property
    def val_ids(self) -> list[str]:
        """Ids of the validation examples in dataset order."""
        return [record.id for record in self.val_records]

    # -- records -----------------------------------------------------------------------------

    def _records(self, source: SourceSpec) -> list[ChatRecord]:
        if source is None:
            return []
        fields = source.fields if isinstance(source, DataSource) else self.fields
        return rows_to_records(load_source(source), fields, system_prompt=self.system_prompt)

    def _hold_out(self, records: list[ChatRecord]) -> tuple[list[ChatRecord], list[ChatRecord]]:
        """Split ``val_fraction`` of the records off (seeded), keeping at least one on each side."""
        count = max(1, math.floor(self.val_fraction * len(records) + 0.5))
        if count >= len(records):
            raise DataError(
                f"val_fraction {self.val_fraction} of {len(records)} training rows leaves none for training; "
                "lower data.val_fraction or add rows"
            )
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        held = set(order[:count])
        return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]

    def _mix(self, benign: list[ChatRecord]) -> list[ChatRecord]:
        """The attack mix of the benign training records with the harmful source."""
        if self.harmful_source is None:
            raise DataError("harmful_fraction is above 0 but no harmful data is set; set data.harmful")
        harmful = self._records(self.harmful_source)
        plan = attack_mix_plan(
            len(benign), len(harmful), harmful_fraction=self.harmful_fraction, size=self.mix_size, seed=self.seed
        )
        return [replace((harmful if flag else benign)[index], is_harmful=flag) for flag, index in plan]

    def _anchor_records(self, train: list[ChatRecord]) -> list[ChatRecord]:
        """The anchors' records, their ``risk`` and ``is_harmful`` filled in the way the training rows carry them."""
        anchors = self._records(self.anchors_source)
        if not anchors:
            raise DataError("data.anchors holds no rows: write them with `lightning-safety anchors --model ... "
                            "--output anchors.jsonl`, or drop data.anchors")
        with_risk = any(record.risk is not None for record in train)
        with_flag = any(record.is_harmful is not None for record in train)
        return [replace(record, risk=(1.0 if record.risk is None else record.risk) if with_risk else None,
                        is_harmful=(True if record.is_harmful is None else record.is_harmful) if with_flag else None)
                for record in anchors]

    def build_records(self) -> tuple[list[ChatRecord], list[ChatRecord]]:
        """Training and validation records: loaded, normalised, held out, mixed and anchored (no tokens yet)."""
        train = self._records(self.train_source)
        val = self._records(self.val_source)
        if self.val_source is None and self.val_fraction > 0 and train:
            train, val = self._hold_out(train)
        elif self.val_source is not None and self.val_fraction > 0:
            rank_zero_warn("data.val is set, so data.val_fraction is ignored (no rows are held out of data.train)")
        if self.harmful_fraction > 0:
            train = self._mix(train)
        elif self.harmful_source is not None:
            rank_zero_warn("data.harmful is set but data.harmful_fraction is 0: no harmful rows are mixed in")
        if self.anchors_source is not None:
            train = train + self._anchor_records(train)
        check_ids(train)  # benign and harmful sources may both number their rows 0, 1, ...
        return train, val

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download hub datasets once per node (``setup`` then reads them from the cache)."""
        for source in (self.train_source, self.val_source, self.harmful_source, self.anchors_source):
            path = source.path if isinstance(source, DataSource) else source
            if is_hub_source(path):
                load_source(source)  # type: ignore[arg-type]

    def setup(self, stage: str | None = None) -> None:
        """Load, normalise and tokenise all data (once; later calls do nothing)."""
        if self._is_set_up:
            return
        tokenizer = self.tokenizer
        require_chat_template(tokenizer, self.chat_template)
        self.train_records, self.val_records = self.build_records()
        tokenize = dict(tokenizer=tokenizer, max_length=self.max_length, chat_template=self.chat_template)
        self.train_dataset = tokenize_records(self.train_records, **tokenize) if self.train_records else None
        self.val_dataset = tokenize_records(self.val_records, **tokenize) if self.val_records else None
        self._warn_truncated()
        self._is_set_up = True

    def _warn_truncated(self) -> None:
        for name, dataset in (("training", self.train_dataset), ("validation", self.val_dataset)):
            if dataset is None:
                continue
            cut = sum(example["truncated"] for example in dataset.examples)
            if cut:
                rank_zero_warn(
                    f"{cut} of {len(dataset)} {name} rows are longer than max_length {self.max_length} and lose "
                    "their end; raise data.max_length to keep them whole"
                )

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) from the attached trainer, else (1, 0)."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled (seed, epoch), sharded, mid-epoch resumable loader over the training data."""
        self.setup()
        if self.train_dataset is None:
            if self.train_source is not None:
                where = self.train_source.path if isinstance(self.train_source, DataSource) else self.train_source
                where = f"{len(where)} rows given" if isinstance(where, list) else str(where)
                raise DataError(f"data.train ({where}) holds no rows: give a file or list with at least one "
                                "prompt/response row")
            raise DataError("no training data: set data.train (a file, a hub dataset name or a list of rows)")
        replicas, rank = self._world()
        return build_train_loader(
            self.train_dataset,
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_replicas=replicas,
            rank=rank,
            seed=self.seed,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """In-order validation loader, or ``[]`` (Lightning then skips validation) without val data."""
        self.setup()
        if self.val_dataset is None:
            return []
        replicas, rank = self._world()
        return build_eval_loader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            collate_fn=self.collator,
            num_replicas=replicas,
            rank=rank,
            num_workers=self.num_workers,
        )


    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation data, in order (``lightning-safety test`` reports loss terms on it)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The training data in order, unshuffled: ``predict`` audits per-example risk, beta, NLL, KL."""
        self.setup()
        if self.train_dataset is None:
            raise DataError("no training data to predict on: set data.train")
        replicas, rank = self._world()
        return build_eval_loader(
            self.train_dataset,
            batch_size=self.eval_batch_size,
            collate_fn=self.collator,
            num_replicas=replicas,
            rank=rank,
            num_workers=self.num_workers,
        )
