"""The frozen, safe reference model that the KL term holds risky updates close to.

Reference strategies (the frozen, safe model the KL term holds risky updates close to):

* ``adapter_disabled``: LoRA on a base model; the reference is the same model with the adapter
  switched off. One copy of the base weights, shared.
* ``adapter_copy``: training continues an already-trained adapter; a frozen copy of that adapter
  (a second PEFT adapter named ``reference`` on the same base) is the reference. Disabling the
  adapter would be the wrong model here: the trained adapter is part of the safe model.
* ``model_copy``: full fine-tuning; a frozen copy of the starting model in eval mode, outside
  the optimizer and outside checkpoints.
* ``separate``: another model (hub id, folder, GGUF or alias) with the same vocabulary.

Every reference forward runs under ``torch.no_grad()`` with dropout off.

:class:`Reference` is the one object the training step talks to, whatever the strategy: it
builds nothing itself (the module loads models), but knows how to run the reference's forward
(:meth:`Reference.logits`), how to project its logits late, chunk by chunk
(:meth:`Reference.projection`), and how to make the policy act as its own reference
(:meth:`Reference.active`, like TRL's ``null_ref_context``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_safety.errors import IncompatibleReferenceError, ModelLoadError
from lightning_safety.losses import ProjectedLogits
from lightning_safety.models import causal_lm_logits, decoder_and_output_layer, eval_mode
from lightning_safety.reference_cache import DEFAULT_TOP_K, ReferenceCache, ReferenceCacheError, ReferenceCacheWriter

__all__ = [
    "Reference",
    "ReferenceStrategy",
    "REFERENCE_ADAPTER",
    "resolve_reference_strategy",
    "add_reference_adapter",
    "frozen_copy",
    "check_same_vocabulary",
    "reference_adapter",
    "late_projection_parts",
    "late_projection_matches",
    "reference_logits",
    "reference_fingerprint",
    "open_reference_cache",
    "precompute_reference",
]

ReferenceStrategy = Literal["auto", "adapter_disabled", "adapter_copy", "model_copy", "separate"]
REFERENCE_ADAPTER = "reference"
_UNCHECKED = object()


class Reference:
    """The frozen reference of a policy, for any strategy, behind one interface.

    Args:
        strategy: a resolved strategy (see :func:`resolve_reference_strategy`): ``adapter_disabled``,
            ``adapter_copy``, ``model_copy`` or ``separate``.
        policy: the trained model (a PEFT model for the adapter strategies).
        model: the frozen reference module for ``model_copy`` / ``separate``, else None.
        late_projection: allow projecting the reference's logits per chunk inside the loss
            (checked once against the model's own logits; off for sharded models, whose output
            layer is gathered only inside their forward).

    Example::

        reference = Reference("adapter_disabled", peft_policy)
        logits = reference.logits(input_ids, attention_mask)  # [B, T, V], no grad, dropout off
        with reference.active() as model:                      # the policy with its adapter off
            hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    """

    def __init__(
        self, strategy: str, policy: nn.Module, model: nn.Module | None = None, *, late_projection: bool = True
    ) -> None:
        if strategy in ("model_copy", "separate") and model is None:
            raise ModelLoadError(f"reference '{strategy}' needs its frozen model; none was built")
        self.strategy = strategy
        self.policy = policy
        self.model = model
        self.late_projection = late_projection
        self._projection: object = _UNCHECKED

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yield the module that computes the reference, in eval mode with its adapter switched.

        For the adapter strategies that is the policy itself with the adapter off (or the frozen
        ``reference`` adapter on); everything is restored on exit.
        """
        if self.model is not None:
            with eval_mode(self.model):
                yield self.model
            return
        switch = self.policy.disable_adapter() if self.strategy == "adapter_disabled" else reference_adapter(self.policy)
        with eval_mode(self.policy), switch:
            yield self.policy

    def projection(self, input_ids: Tensor) -> tuple[nn.Module, nn.Module] | None:
        """Decoder and output layer for the late projection, or None where it does not apply.

        Checked once, on the first few tokens of ``input_ids`` [B, T], against the model's own
        logits: models that post-process logits (soft-capping, scaling) fall back to full logits.
        """
        if not self.late_projection:
            return None
        if self._projection is _UNCHECKED:
            parts = late_projection_parts(self.strategy, self.policy, self.model)
            if parts is not None and not late_projection_matches(
                self.strategy, self.policy, self.model, parts, input_ids[:1, :16]
            ):
                parts = None
            self._projection = parts
        return self._projection  # type: ignore[return-value]

    def logits(
        self, input_ids: Tensor, attention_mask: Tensor | None, logits_to_keep: int = 0
    ) -> Tensor | ProjectedLogits:
        """The reference's logits ``[B, T', V]`` (no grad, dropout off), projected late when it can.

        ``logits_to_keep = k > 0`` keeps the last k positions only (``T' = k``).
        """
        return reference_logits(
            self.strategy,
            self.policy,
            self.model,
            input_ids,
            attention_mask,
            logits_to_keep=logits_to_keep,
            projection=self.projection(input_ids),
        )


def resolve_reference_strategy(
    strategy: ReferenceStrategy, *, lora: bool, adapter: bool, reference_model: str | None
) -> str:
    """``auto`` -> ``separate`` if a reference model is named, else ``adapter_copy`` when training
    continues an adapter, ``adapter_disabled`` under LoRA, and ``model_copy`` otherwise."""
    if strategy == "auto":
        if reference_model is not None:
            return "separate"
        if adapter:
            return "adapter_copy"
        return "adapter_disabled" if lora else "model_copy"
    peft = lora or adapter
    if strategy in ("adapter_disabled", "adapter_copy") and not peft:
        raise ModelLoadError(
            f"reference '{strategy}' needs a LoRA policy: set model.lora (or model.adapter), "
            "or use reference 'model_copy' for full fine-tuning"
        )
    if strategy == "separate" and reference_model is None:
        raise ModelLoadError("reference 'separate' needs model.reference_model (a model name or path)")
    if strategy not in ("adapter_disabled", "adapter_copy", "model_copy", "separate"):
        raise ModelLoadError(
            f"unknown reference strategy '{strategy}': use auto, adapter_disabled, adapter_copy, "
            "model_copy or separate"
        )
    return strategy


def add_reference_adapter(policy: nn.Module) -> None:
    """Copy the active adapter into a frozen second adapter named ``reference`` (adapter_copy)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    active = policy.active_adapter
    policy.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(policy.peft_config[active]))
    weights = get_peft_model_state_dict(policy, adapter_name=active)
    set_peft_model_state_dict(policy, weights, adapter_name=REFERENCE_ADAPTER)
    policy.set_adapter(active)
    for name, parameter in policy.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            parameter.requires_grad_(False)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter frozen (the ``model_copy`` reference)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def check_same_vocabulary(policy: nn.Module, reference: nn.Module, policy_tokenizer=None, reference_tokenizer=None) -> None:
    """Raise :class:`IncompatibleReferenceError` unless both models score the same tokens."""
    policy_vocab = policy.get_output_embeddings().weight.shape[0]
    reference_vocab = reference.get_output_embeddings().weight.shape[0]
    if policy_vocab != reference_vocab:
        raise IncompatibleReferenceError(
            f"policy vocabulary ({policy_vocab}) and reference vocabulary ({reference_vocab}) differ: "
            "the KL compares token distributions, so use a reference from the same model family"
        )
    if policy_tokenizer is not None and reference_tokenizer is not None:
        if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
            raise IncompatibleReferenceError(
                "policy and reference tokenizers map tokens to different ids: the KL compares "
                "token distributions, so use a reference with the policy's tokenizer"
            )


@contextlib.contextmanager
def reference_adapter(policy: nn.Module) -> Iterator[None]:
    """Make the frozen ``reference`` adapter active, then restore the trained one.

    PEFT's ``set_adapter`` marks the active adapter trainable; the flags are restored so the
    optimizer's view of the parameters never changes.
    """
    active = policy.active_adapter
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    policy.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        policy.set_adapter(active)
        for name, parameter in policy.named_parameters():
            parameter.requires_grad_(flags[name])


def late_projection_parts(strategy: str, policy: nn.Module, reference: nn.Module | None) -> tuple[nn.Module, nn.Module] | None:
    """The reference's decoder (final hidden states) and frozen output layer, if it has them.

    With these the reference's logits can be projected chunk by chunk inside the loss
    (:class:`~lightning_safety.losses.ProjectedLogits`) instead of as one ``[B, T, V]`` tensor.
    None when the output layer is trainable or adapted (it would not be the reference's), or the
    model does not expose the usual ``base_model_prefix`` decoder. Models that post-process
    logits (soft-capping, scaling) are caught by :func:`late_projection_matches`.
    """
    model = reference if strategy in ("model_copy", "separate") else policy
    if model is None:
        return None
    parts = decoder_and_output_layer(model)
    if parts is None or any(p.requires_grad for p in parts[1].parameters()):
        return None
    return parts


def late_projection_matches(
    strategy: str, policy: nn.Module, reference: nn.Module | None, parts: tuple[nn.Module, nn.Module], input_ids: Tensor
) -> bool:
    """Check on a few real tokens that decoder + output layer reproduce the model's own logits."""
    full = reference_logits(strategy, policy, reference, input_ids, None)
    projected = reference_logits(strategy, policy, reference, input_ids, None, projection=parts).materialize()
    scale = float(full.abs().max().clamp(min=1.0))
    return full.shape == projected.shape and bool(torch.allclose(full.float(), projected.float(), rtol=1e-3, atol=1e-4 * scale))


@torch.no_grad()
def reference_logits(
    strategy: str,
    policy: nn.Module,
    reference: nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    logits_to_keep: int = 0,
    projection: tuple[nn.Module, nn.Module] | None = None,
) -> Tensor | ProjectedLogits:
    """Logits [B, T', V] of the frozen reference for a batch, without gradients or dropout.

    ``logits_to_keep = k > 0`` computes the output layer for the last k positions only (T' = k).
    With ``projection = (decoder, output_layer)`` (see :func:`late_projection_parts`) only the
    final hidden states are computed here, and the output layer is applied chunk by chunk later.
    """
    with Reference(strategy, policy, reference).active() as model:
        if projection is None:
            return causal_lm_logits(model, input_ids, attention_mask, logits_to_keep)
        decoder, output_layer = projection
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return ProjectedLogits(hidden, output_layer, output_layer.out_features)


def reference_fingerprint(
    strategy: str, policy: nn.Module, reference: nn.Module | None, start_fingerprint: str | None
) -> str | None:
    """A short identity of the frozen reference, for the reference cache (None if not computable yet).

    ``adapter_disabled`` and ``model_copy``: the starting model's fingerprint (the reference is that
    model); ``adapter_copy``: that plus a hash of the frozen ``reference`` adapter's weights;
    ``separate``: the reference model's own fingerprint. Weights still on the meta device (delayed
    initialisation) give None.
    """
    # Imported here: lightning_safety.risk imports this module (estimators read the reference).
    from lightning_safety.risk.probe.artifact import model_fingerprint

    hasher = hashlib.sha256(strategy.encode())
    if strategy == "separate":
        if reference is None or any(p.is_meta for p in reference.parameters()):
            return None
        hasher.update(model_fingerprint(reference).encode())
    else:
        if start_fingerprint is None:
            return None
        hasher.update(start_fingerprint.encode())
    if strategy == "adapter_copy":
        for name, parameter in policy.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                hasher.update(name.encode())
                hasher.update(parameter.detach().float().cpu().numpy().tobytes())
    return hasher.hexdigest()[:32]


def open_reference_cache(path: str, fingerprint: str | None, policy: nn.Module) -> ReferenceCache:
    """Open a reference cache for this reference, refusing one built for another model or vocabulary."""
    if fingerprint is None:
        raise ReferenceCacheError(
            "model.reference_cache needs the reference's weights to check the cache against; they are not "
            "materialised yet (delayed initialisation): build the module without it, or load real weights"
        )
    cache = ReferenceCache.open(path, fingerprint=fingerprint)
    vocab = policy.get_output_embeddings().weight.shape[0]
    if cache.vocab_size != vocab:
        raise ReferenceCacheError(
            f"the reference cache at {path} was built for a vocabulary of {cache.vocab_size} tokens, the model has "
            f"{vocab}: rebuild it with `lightning-safety precompute-reference`"
        )
    return cache


@torch.no_grad()
def precompute_reference(
    reference: Reference,
    batches: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    fingerprint: str,
    top_k: int = DEFAULT_TOP_K,
    logprob_dtype: str = "float32",
) -> ReferenceCache:
    """Run the reference once over ``batches`` and write its top-k output per response token to ``path``.

    Each batch needs ``id`` (example ids), ``input_ids``, ``attention_mask`` and ``labels`` [B, T]
    (as :class:`~lightning_safety.data.ChatSFTDataModule` gives them); an id seen twice is
    computed once. The folder appears only when every batch is done.

    Returns:
        The written cache, opened.
    """
    vocab = reference.policy.get_output_embeddings().weight.shape[0]
    with ReferenceCacheWriter(path, top_k, vocab, fingerprint, logprob_dtype=logprob_dtype) as writer:
        for batch in batches:
            ids = batch.get("id")
            if ids is None:
                raise ReferenceCacheError("precomputing the reference needs example ids (batch['id']): use ChatSFTDataModule")
            labels = batch["labels"]
            new = [i for i, example_id in enumerate(ids) if str(example_id) not in writer]
            if not new:
                continue
            rows = torch.tensor(new, device=labels.device)
            mask = batch.get("attention_mask")
            logits = reference.logits(batch["input_ids"][rows], None if mask is None else mask[rows])
            writer.add_batch([str(ids[i]) for i in new], logits, labels[rows])
    return ReferenceCache.open(path, fingerprint=fingerprint)
