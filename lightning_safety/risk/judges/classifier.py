"""A sequence-classification model as a judge (e.g. a fine-tuned harmful-prompt classifier)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.errors import JudgeError, ModelLoadError
from lightning_safety.risk.judges.base import Judge
from lightning_safety.models import accepts_argument
from lightning_safety.risk.judges.causal import load_judge_tokenizer, model_label, resolve_device


def _load_classifier(name: str, dtype: str | torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from lightning_safety.models import resolve_dtype, resolve_model_source

    source = resolve_model_source(name)
    kwargs: dict[str, Any] = {}
    if (torch_dtype := resolve_dtype(dtype)) is not None:
        kwargs["dtype"] = torch_dtype
    try:
        return AutoModelForSequenceClassification.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"could not load the classifier '{name}' ({first}): pass a folder or hub id of an "
            "AutoModelForSequenceClassification model"
        ) from error


def resolve_label(config: Any, label: str | int) -> int:
    """Index of ``label`` (a name looked up in ``config.label2id``, or an index) among the outputs."""
    count = int(getattr(config, "num_labels", 0) or 0)
    if isinstance(label, str):
        label2id = {str(name): int(index) for name, index in (getattr(config, "label2id", None) or {}).items()}
        if label not in label2id:
            folded = [name for name in label2id if name.lower() == label.lower()]
            if len(folded) != 1:
                raise JudgeError(
                    f"label '{label}' is not one of the classifier's labels ({', '.join(sorted(label2id)) or 'none'}): "
                    "pass harmful_label as one of them, or as an output index"
                )
            label = folded[0]
        index = label2id[label]
    else:
        index = int(label)
    if not 0 <= index < count:
        hint = " (one output, read as a sigmoid: pass harmful_label=0)" if count == 1 else ""
        raise JudgeError(
            f"harmful_label {label!r} is output index {index}, but the classifier has {count} output(s){hint}: "
            f"pass an index from 0 to {count - 1} or a label name"
        )
    return index


class ClassifierJudge(Judge):
    """Any ``AutoModelForSequenceClassification``: score = probability of the harmful label.

    The text classified is the request, or ``request + "\\n" + response`` when responses are
    given. Probabilities are a softmax over the outputs (a sigmoid when there is one output).
    Text longer than ``max_length`` tokens is truncated at the end.

    Args:
        model: the classifier, or its name (hub id or folder) to load.
        tokenizer: its tokenizer (loaded from ``model`` when None).
        harmful_label: the harmful class, as a label name (``config.label2id``) or an index.
        batch_size: texts per forward pass.
        max_length: longest input in tokens.
        device: where to run; None keeps a given model where it is.
        dtype: dtype to load a named model in.
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        *,
        harmful_label: str | int = 1,
        batch_size: int = 16,
        max_length: int = 512,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.tokenizer = load_judge_tokenizer(model, tokenizer)
        loaded_here = isinstance(model, str)
        self.model = _load_classifier(model, dtype) if loaded_here else model
        self.device = resolve_device(self.model, device, loaded_here)
        self.harmful_index = resolve_label(self.model.config, harmful_label)
        self.max_length = int(max_length)
        self._label = model_label(model)
        # Fast tokenizers may add token_type_ids that decoder classifiers do not take.
        self._input_names = {"input_ids", "attention_mask"} | (
            {"token_type_ids"} if accepts_argument(self.model, "token_type_ids") else set()
        )
        if getattr(self.model.config, "pad_token_id", None) is None:
            # Decoder classifiers find each row's last token through the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @property
    def name(self) -> str:
        return f"classifier:{self._label}"

    @torch.no_grad()
    def _score_batch(self, prompts: list[str], responses: list[str] | None) -> tuple[Tensor, list[float]]:
        from lightning_safety.models import eval_mode

        texts = prompts if responses is None else [f"{p}\n{r}" for p, r in zip(prompts, responses)]
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        inputs = {key: value for key, value in encoded.items() if key in self._input_names}
        with eval_mode(self.model):
            logits = self.model(**inputs).logits.float().cpu()
        if logits.shape[-1] == 1:
            probabilities = logits[:, 0].sigmoid()
        else:
            probabilities = logits.softmax(dim=-1)[:, self.harmful_index]
        return probabilities, probabilities.tolist()
