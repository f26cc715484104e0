"""Risk estimators over a training batch: the activation probe and the Safety Critic judges.

Both read any LightningModule that exposes a Hugging Face causal LM (``policy`` or ``model``
attribute, or one named with ``model_attr``); neither assumes :class:`SafeFineTuning`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_safety.distributed import is_fsdp1, is_sharded
from lightning_safety.errors import RiskError
from lightning_safety.models import is_peft_model
from lightning_safety.reference import REFERENCE_ADAPTER, reference_adapter
from lightning_safety.risk.base import RiskEstimator
from lightning_safety.risk.hooks import LayerTaps
from lightning_safety.risk.judges import Judge
from lightning_safety.risk.probe import ActivationProbe
from lightning_safety.risk.probe.artifact import adapter_fingerprint

ProbeSource = Literal["reference", "policy"]


def find_causal_lm(pl_module: nn.Module, model_attr: str | None = None) -> nn.Module:
    """The Hugging Face causal LM inside a LightningModule.

    ``model_attr`` (dotted, e.g. ``"backbone.lm"``) names it; otherwise ``policy`` or ``model`` is
    used, or the module itself when it is a Hugging Face model.
    """
    if model_attr:
        target: Any = pl_module
        for part in model_attr.split("."):
            target = getattr(target, part, None)
        if not isinstance(target, nn.Module):
            raise RiskError(f"the LightningModule has no model at '{model_attr}': name the attribute that holds it")
        return target
    for name in ("policy", "model"):
        candidate = getattr(pl_module, name, None)
        if isinstance(candidate, nn.Module):
            return candidate
    if hasattr(pl_module, "config") and hasattr(pl_module, "get_input_embeddings"):
        return pl_module
    raise RiskError(
        f"cannot find a Hugging Face model in {type(pl_module).__name__}: expose it as `policy` or `model`, "
        "or pass model_attr"
    )


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


class ReferenceView(NamedTuple):
    """Where an estimator reads the frozen reference: call ``target`` inside ``view()``.

    ``view`` is ready: it switches a PEFT adapter off (the base is the reference) or the frozen
    reference adapter on (``adapter_copy``) as needed, so callers read ``target`` as it is inside
    it. ``adapter_id`` is what the view reads beyond the base weights: ``":"`` and 12 hex characters
    of the frozen ``reference`` adapter under ``adapter_copy``, else ``""``. Estimators cached per
    example add it to their namespace, so that scores read through one starting adapter are not
    reused with another.
    """

    target: nn.Module
    view: Callable[[], contextlib.AbstractContextManager]
    adapter_id: str


def reference_reader(pl_module: nn.Module, model_attr: str | None, source: ProbeSource, what: str) -> ReferenceView:
    """The :class:`ReferenceView` of a LightningModule (``source="policy"``: the training model as it is).

    Found as: the module's ``reference`` when it has one, else the PEFT base with the adapter off,
    or the frozen reference adapter under ``adapter_copy``. Collective under FSDP2 (the adapter's
    fingerprint).
    """
    model = find_causal_lm(pl_module, model_attr)
    reference = getattr(pl_module, "reference", None)
    adapter_id = ""
    if source == "policy":
        target, view = model, contextlib.nullcontext
    elif isinstance(reference, nn.Module):
        target, view = reference, contextlib.nullcontext
    elif is_peft_model(model) and getattr(pl_module, "reference_strategy", None) == "adapter_copy":
        target, view = model, lambda: reference_adapter(model)
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            adapter_id = ":" + adapter_fingerprint(model, REFERENCE_ADAPTER)[:12]
    elif is_peft_model(model):
        target, view = model, model.disable_adapter
    else:
        raise RiskError(
            f"{what} from the reference needs a frozen reference (a `reference` module, or a LoRA policy "
            "whose base is the reference): give the module a reference" + (
                ", or use source='policy'" if what == "probe risk" else "")
        )
    if is_fsdp1(target) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Callbacks run outside the FSDP1 root's forward, where its flat weights stay sharded.
        raise RiskError(
            f"{what} on FSDP1-wrapped weights (FSDPStrategy) is not supported: train with FSDP2 "
            "(ModelParallelStrategy), or score the data first (`lightning-safety score`) and train from its risk column"
        )
    return ReferenceView(target, view, adapter_id)


class ProbeRisk(RiskEstimator):
    """Risk = an activation probe's harmful probability from the prompt's pre-generation activations.

    Args:
        probe: an :class:`~lightning_safety.risk.probe.ActivationProbe` or the folder of a saved one.
        source: ``"reference"`` reads the frozen reference (``pl_module.reference`` when the module
            has one, else the PEFT base with the adapter switched off, or the frozen reference
            adapter under ``adapter_copy``): the risk is then a property of the example and is
            cached, one prompt-only forward per example per run. ``"policy"`` reads the model as
            it trains (not cached).
        model_attr: attribute of the LightningModule holding the causal LM (default: ``policy``
            or ``model``).

    Hooks are registered on the probe's layers, resolved by module identity, in :meth:`setup`
    and removed in :meth:`teardown`; the probe's fingerprint must match the model it reads.
    """

    def __init__(self, probe: ActivationProbe | str | Path, source: ProbeSource = "reference", model_attr: str | None = None) -> None:
        if source not in ("reference", "policy"):
            raise RiskError(f"probe source '{source}' is unknown: use 'reference' or 'policy'")
        self.probe = probe if isinstance(probe, ActivationProbe) else ActivationProbe.load(probe)
        self.source = source
        self.model_attr = model_attr
        self.cacheable = source == "reference"
        self.taps: LayerTaps | None = None
        self._target: nn.Module | None = None
        self._view: Any = contextlib.nullcontext
        self._reference_adapter = ""  # set up under adapter_copy: the reference adapter read

    @property
    def namespace(self) -> str:
        return self.checkpoint_namespace + self._reference_adapter

    @property
    def checkpoint_namespace(self) -> str:
        probe = self.probe
        return f"probe:{probe.fingerprint[:12]}:{probe.pooling}:{','.join(map(str, probe.layers))}:{_state_digest(probe.classifier)}"

    def setup(self, pl_module: nn.Module) -> None:
        if self.taps is not None:
            return
        reader = reference_reader(pl_module, self.model_attr, self.source, what="probe risk")
        self.probe.check_model(reader.target)
        self.taps = LayerTaps.for_model(reader.target, self.probe.layers)
        self._target, self._view, self._reference_adapter = reader

    reads_model = "a model's activations: pass model= (the model the probe was trained on)"

    def teardown(self) -> None:
        if self.taps is not None:
            self.taps.remove()
        self.taps, self._target = None, None

    @property
    def is_set_up(self) -> bool:  # type: ignore[override]
        return self.taps is not None

    @property
    def collective(self) -> bool:  # type: ignore[override]
        return self._target is not None and is_sharded(self._target)

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        if self._target is None or self.taps is None:
            raise RiskError("ProbeRisk was called before setup(): attach it through a RiskCallback")
        with self._view():
            return self.probe.score(
                self._target,
                batch["input_ids"],
                batch["attention_mask"],
                batch["prompt_length"],
                taps=self.taps,
                use_adapter=True,  # the view has set the adapters: read the model as it is
            )


def split_conversation(messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
    """(request, response) text of a training conversation for a judge.

    The request is the user turns before the first assistant turn (joined by blank lines), the
    response the first assistant turn: what the paper's Safety Critic scores. System turns are
    left out (they are the operator's, not the example's).
    """
    request, response = [], ""
    for message in messages:
        if message["role"] == "assistant":
            response = message["content"]
            break
        if message["role"] == "user":
            request.append(message["content"])
    return "\n\n".join(request), response


class JudgeRisk(RiskEstimator):
    """Risk = a judge's harm score of the example's (request, response) text; cached per example.

    The batch must carry the conversations (``batch["messages"]``, as ChatSFTDataModule's do).
    A failed judge call gives risk 1 (the judge fails closed) and is counted in ``failures``.

    Args:
        judge: any :class:`~lightning_safety.risk.judges.Judge`.
        include_response: judge the request together with the dataset's answer (the paper's
            Safety Critic) or the request alone. A batch of prompts without answers (no assistant
            turn, as :func:`~lightning_safety.risk.scoring.score_prompts` builds) is judged request alone.
    """

    cacheable = True

    def __init__(self, judge: Judge, include_response: bool = True) -> None:
        self.judge = judge
        self.include_response = include_response

    @property
    def namespace(self) -> str:
        head = getattr(self.judge, "head", None)
        suffix = f":{_state_digest(head)}" if isinstance(head, nn.Module) else ""
        return f"judge:{self.judge.name}{suffix}:{'pair' if self.include_response else 'request'}"

    @property
    def failures(self) -> int:  # type: ignore[override]
        return self.judge.failures

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        if "messages" not in batch:
            raise RiskError(
                "the batch has no 'messages' for the judge to read: use ChatSFTDataModule or add the "
                "conversations to your batches"
            )
        pairs = [split_conversation(messages) for messages in batch["messages"]]
        requests = [request for request, _ in pairs]
        answered = any(m["role"] == "assistant" for messages in batch["messages"] for m in messages)
        responses = [response for _, response in pairs] if self.include_response and answered else None
        return self.judge.score(requests, responses).score.to(batch["input_ids"].device)

