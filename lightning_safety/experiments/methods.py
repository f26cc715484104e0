"""The fine-tuning methods the demo and the replication benchmark compare, run one at a time.

Every method is the same LoRA fine-tuning of a safe model (:class:`~lightning_safety.module.SafeFineTuning`,
reference = the safe model with the adapter switched off, so one copy of the weights) with a
different weight on the KL toward that reference:

=================  =============================================================================
``sft``            plain SFT: beta = 0 (the attack as it is)
``constant_kl``    the paper's C-SFT: the same beta for every example
``adaptive_probe`` beta = beta_min + (beta_max - beta_min) * risk, risk from an activation probe
``adaptive_judge`` the same with risk from a judge rating the request alone
``adaptive_judge_pair`` the same with a judge rating the (request, response) pair (the paper's Safety Critic)
``adaptive_max``   the same with the higher of the two risks (defence in depth)
``adaptive_probe_refusal`` the higher of the probe's risk and the reference's own refusal probability
                   (:class:`~lightning_safety.risk.refusal.RefusalRisk`: defence in depth)
=================  =============================================================================

Example::

    result = finetune(aligned_folder, rows, method("adaptive_probe"), FinetuneSettings(epochs=2), probe=probe)
    responses = generate_responses(result.model, result.tokenizer, prompts)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lightning_safety.errors import LightningSafetyError
from lightning_safety.experiments.recipe import fine_tune
from lightning_safety.losses import check_kl_scale
from lightning_safety.models import LoraSettings, load_tokenizer
from lightning_safety.risk.compose import MaxRisk
from lightning_safety.risk.estimators import JudgeRisk, ProbeRisk
from lightning_safety.risk.refusal import RefusalRisk
from lightning_safety.schedules import ConstantBeta, LinearRiskSchedule

__all__ = ["METHODS", "FinetuneResult", "FinetuneSettings", "Method", "MethodError", "estimator_rates", "finetune",
           "method"]

RiskKind = Literal["none", "probe", "judge", "judge_pair", "max", "probe_refusal"]


class MethodError(LightningSafetyError):
    """A method name, its beta or the estimators it needs are wrong."""


@dataclass(frozen=True)
class Method:
    """One compared fine-tuning method.

    Attributes:
        name: one of :data:`METHODS`.
        risk: which risk estimator feeds beta (``none`` for the constant-beta methods).
        beta: the constant beta of ``sft`` (0) and ``constant_kl``; None for the adaptive methods.
    """

    name: str
    risk: RiskKind = "none"
    beta: float | None = None

    @property
    def label(self) -> str:
        return f"constant_kl(beta={self.beta:g})" if self.name == "constant_kl" else self.name


METHODS: tuple[str, ...] = ("sft", "constant_kl", "adaptive_probe", "adaptive_judge", "adaptive_judge_pair",
                            "adaptive_max", "adaptive_probe_refusal")


def method(name: str, beta: float | None = None) -> Method:
    """The :class:`Method` called ``name``; ``constant_kl`` needs its ``beta`` in (0, 1]."""
    if name == "sft":
        return Method("sft", "none", 0.0)
    if name == "constant_kl":
        if beta is None or not 0.0 < float(beta) <= 1.0:
            raise MethodError(f"constant_kl needs a beta in (0, 1], got {beta!r}: pick one on a validation split")
        return Method("constant_kl", "none", float(beta))
    risks = {"adaptive_probe": "probe", "adaptive_judge": "judge", "adaptive_judge_pair": "judge_pair",
             "adaptive_max": "max", "adaptive_probe_refusal": "probe_refusal"}
    if name not in risks:
        raise MethodError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return Method(name, risks[name])  # type: ignore[arg-type]


def _default_lora() -> LoraSettings:
    return LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


@dataclass(frozen=True)
class FinetuneSettings:
    """Sizes of one fine-tuning run (the same for every method of a comparison).

    Args:
        epochs: passes over the rows.
        lr: AdamW learning rate of the LoRA weights (constant; gradients clipped at norm 1).
        lora: the adapter trained.
        max_length: tokens per row (longer rows lose their end).
        batch_size: rows per optimizer step.
        seed: LoRA initialisation, dropout and data order.
        beta_min, beta_max: the adaptive methods' linear schedule (the paper: 0.1 and 0.9).
        normalization: how the loss averages over a batch: ``token`` or ``example`` (every row
            weighs the same; see :class:`~lightning_safety.module.SafeFineTuning`).
        reference_cache_top_k: read the reference from a top-k reference cache written before
            training (None: run the reference every step).
        kl_scale: a factor on the adaptive and constant-KL methods' KL term, leaving the NLL's
            ``1 - beta`` as it is (1: the paper; see :func:`~lightning_safety.losses.adaptive_kl_loss`).
    """

    epochs: int = 2
    lr: float = 2e-4
    lora: LoraSettings = field(default_factory=_default_lora)
    max_length: int = 128
    batch_size: int = 8
    seed: int = 0
    beta_min: float = 0.1
    beta_max: float = 0.9
    normalization: str = "token"
    reference_cache_top_k: int | None = None
    kl_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "max_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"{name}={value!r} is invalid: use a positive integer")
        if not self.lr > 0:
            raise MethodError(f"lr={self.lr!r} is invalid: use a positive learning rate")
        if not 0.0 <= self.beta_min <= self.beta_max <= 1.0:
            raise MethodError(f"beta_min={self.beta_min}, beta_max={self.beta_max}: need 0 <= beta_min <= beta_max <= 1")
        if self.normalization not in ("token", "example"):
            raise MethodError(f"normalization={self.normalization!r} is invalid: use 'token' or 'example'")
        try:
            check_kl_scale(self.kl_scale)
        except LightningSafetyError as error:
            raise MethodError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    """A fine-tuned model and what the run measured.

    Attributes:
        model: the fine-tuned model with the LoRA merged in (a plain Hugging Face model, faster to
            generate from than the PEFT wrapper), in eval mode.
        tokenizer: its tokenizer.
        risk: the risk each row was trained with, by row id (empty for constant-beta methods).
        seconds: wall time of the training loop.
        steps: optimizer steps taken.
        failures: risk scores that failed and were set to 1 (fail closed).
    """

    model: nn.Module
    tokenizer: Any
    risk: dict[str, float]
    seconds: float
    steps: int
    failures: int = 0


def _estimator(method_: Method, probe: Any, judge: Any, tokenizer: Any) -> Any:
    def need(thing: Any, what: str) -> Any:
        if thing is None:
            raise MethodError(f"{method_.name} needs a {what}: pass {what}=... to finetune")
        return thing

    # ``judge`` rates the request alone (the replication's head is trained on requests, and a head must
    # score the kind of text it was trained on); ``judge_pair`` rates request + answer, so give it a
    # judge trained on pairs.
    if method_.risk == "probe":
        return ProbeRisk(need(probe, "probe"))
    if method_.risk == "judge":
        return JudgeRisk(need(judge, "judge"), include_response=False)
    if method_.risk == "judge_pair":
        return JudgeRisk(need(judge, "judge"), include_response=True)
    if method_.risk == "max":
        return MaxRisk(ProbeRisk(need(probe, "probe")), JudgeRisk(need(judge, "judge"), include_response=False))
    if method_.risk == "probe_refusal":
        return MaxRisk(ProbeRisk(need(probe, "probe")), RefusalRisk(tokenizer))
    return None


def finetune(
    model: str | Path,
    rows: Sequence[dict[str, Any]],
    method_: Method,
    settings: FinetuneSettings | None = None,
    *,
    probe: Any = None,
    judge: Any = None,
    callbacks: Sequence[Any] = (),
    progress: bool = False,
) -> FinetuneResult:
    """LoRA fine-tune the safe ``model`` on ``rows`` with ``method_``; the reference is ``model`` itself.

    Args:
        model: the safe model (name or folder), e.g. the folder of
            :func:`~lightning_safety.experiments.alignment.build_aligned_reference`.
        rows: ``{"id", "prompt", "response", ...}`` training rows; a row's ``system`` field, where
            present, is its system prompt.
        method_: see :func:`method`.
        settings: sizes (:class:`FinetuneSettings`).
        probe: an :class:`~lightning_safety.risk.ActivationProbe` of ``model`` (``adaptive_probe``/``max``/
            ``adaptive_probe_refusal``).
        judge: a :class:`~lightning_safety.risk.judges.Judge` (``adaptive_judge``/``judge_pair``/``max``).
        callbacks: more Lightning callbacks for the run (e.g. a
            :class:`~lightning_safety.callbacks.SafetyDriftController`: defence in depth).
        progress: Lightning's progress bar.
    """
    # Imported here: the callbacks import Lightning (seconds), and ``lightning-safety --help`` imports this module.
    from lightning_safety.callbacks import RiskCallback

    settings = settings or FinetuneSettings()
    if not rows:
        raise MethodError("finetune got no rows: give the attack's training rows")
    tokenizer = load_tokenizer(str(model))
    estimator = _estimator(method_, probe, judge, tokenizer)
    schedule = (ConstantBeta(float(method_.beta)) if estimator is None
                else LinearRiskSchedule(beta_min=settings.beta_min, beta_max=settings.beta_max))
    risk_callbacks = [RiskCallback(estimator, log_stats=False)] if estimator is not None else []
    done = fine_tune(
        str(model), rows, tokenizer, schedule=schedule, lora=settings.lora, epochs=settings.epochs, lr=settings.lr,
        weight_decay=0.0, max_length=settings.max_length, batch_size=settings.batch_size, seed=settings.seed,
        normalization=settings.normalization, callbacks=[*risk_callbacks, *callbacks], progress=progress,
        reference_cache_top_k=settings.reference_cache_top_k, kl_scale=settings.kl_scale,
    )
    risk: dict[str, float] = {}
    failures = 0
    if risk_callbacks and risk_callbacks[0].cache is not None:
        ids = [str(row["id"]) for row in rows]
        scores, _ = risk_callbacks[0].cache.lookup(ids)
        risk = {i: float(s) for i, s in zip(ids, scores.tolist()) if s == s}  # NaN: never scored
        failures = int(getattr(estimator, "failures", 0))
    return FinetuneResult(model=done.model, tokenizer=tokenizer, risk=risk, seconds=round(done.seconds, 1),
                          steps=done.steps, failures=failures)


def estimator_rates(
    risk: dict[str, float], rows: Sequence[dict[str, Any]], threshold: float = 0.5, flag: str = "is_harmful"
) -> dict[str, Any]:
    """How an estimator saw the attack data: recall on the flagged rows and FPR on the others at
    ``threshold``, and the mean risk (hence mean beta) of each kind. ``flag`` is the row field that
    marks the rows a defence should hold (``is_harmful``, or the zoo's ``is_attack``)."""
    harmful = [risk[str(r["id"])] for r in rows if r.get(flag) and str(r["id"]) in risk]
    benign = [risk[str(r["id"])] for r in rows if not r.get(flag) and str(r["id"]) in risk]

    def share(values: list[float]) -> float | None:
        return None if not values else sum(v >= threshold for v in values) / len(values)

    def mean(values: list[float]) -> float | None:
        return None if not values else sum(values) / len(values)

    return {"threshold": threshold, "recall": share(harmful), "fpr": share(benign), "n_harmful": len(harmful),
            "n_benign": len(benign), "mean_risk_harmful": mean(harmful), "mean_risk_benign": mean(benign)}
