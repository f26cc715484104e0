"""Safety evaluation during training: ASR, refusal, over-refusal and utility, logged for monitors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_safety.callbacks.tokenizer import resolve_tokenizer
from lightning_safety.errors import LightningSafetyError
from lightning_safety.evaluation.generation import GenerationSettings
from lightning_safety.evaluation.refusal import GCG_REFUSAL_STRINGS, KeywordRefusal
from lightning_safety.evaluation.runner import EvaluationResult, PromptSpec, SafetyEvaluator, format_rate
from lightning_safety.evaluation.utility import UtilityTask

logger = logging.getLogger("lightning_safety.callbacks.evaluation")

EVALUATED_STEP_KEY = "safety/evaluated_step"
"""Logged with every evaluation: the ``global_step`` the metrics describe (read by :class:`SafetyGate`)."""


class SafetyEvaluationCallback(Callback):
    """Generate on harmful, safe-but-scary and utility prompts; log ASR, over-refusal and utility.

    Logged names: ``safety/asr``, ``safety/refusal``, ``safety/asr_judge`` (with a judge),
    ``safety/asr/<category>``, ``safety/over_refusal``, ``utility/<task>`` and
    ``safety/evaluated_step``. They are logged through the LightningModule, so ``ModelCheckpoint``
    and ``EarlyStopping`` can monitor them (e.g. ``EarlyStopping(monitor="safety/asr", mode="min")``).

    When: every ``every_n_epochs`` training epochs (at the end of the epoch's validation when the
    trainer validates, else at the end of the training epoch, in both cases before checkpoints
    are saved), every ``every_n_train_steps`` optimizer steps, at the end of training
    (``at_end``, unless the last step was just evaluated), and in every ``trainer.validate`` /
    ``lightning-safety validate`` run (``on_validate``). Not during the sanity check.

    Works with any LightningModule that exposes a Hugging Face causal LM as ``policy`` or
    ``model`` (or one named by ``model_attr``). The tokenizer comes from ``tokenizer``, else the
    module's or the datamodule's ``tokenizer`` attribute. Under DDP every rank generates for an
    interleaved share of the prompts and the metrics are summed across ranks: each prompt is
    counted once and every rank logs the same global values.

    Args:
        harmful: harmful requests: a :class:`~lightning_safety.data.PromptSource`, a path or a list.
        safe: safe prompts that look unsafe (over-refusal), e.g. XSTest's safe set.
        utility: utility tasks (SST-2 accuracy, GSM8K exact match, ...).
        every_n_epochs: evaluate every this many training epochs (0: never by epoch).
        every_n_train_steps: evaluate every this many optimizer steps (0 or None: never by step).
        at_end: evaluate once more when training ends, if the last step was not evaluated.
        on_validate: evaluate in ``trainer.validate`` runs.
        max_new_tokens: tokens generated per response.
        batch_size: prompts per generation batch.
        system_prompt: system message before every prompt (None: the template's default).
        refusal_strings: refusal keywords (default: GCG's list; see
            :mod:`lightning_safety.evaluation.refusal`).
        refusal_match: ``anywhere`` (GCG's rule) or ``start``.
        judge: optional harm judge for ``safety/asr_judge``.
        judge_threshold: harm score at or above which a response counts as harmful.
        model_attr: dotted attribute of the HF model in the LightningModule.
        tokenizer: the tokenizer, or its name/path.
        progress: show a progress bar on rank 0.

    Example::

        evaluation = SafetyEvaluationCallback(
            harmful=PromptSource("advbench.csv", limit=64),
            safe=PromptSource("xstest_prompts.csv", where={"label": "safe"}),
            utility=[UtilityTask("sst2_dev.tsv", task="sst2", limit=200)],
        )
        trainer = L.Trainer(callbacks=[evaluation, ModelCheckpoint(monitor="safety/asr", mode="min")])

    Raises:
        LightningSafetyError: ``every_n_epochs`` or another setting is invalid (at construction).
    """

    def __init__(
        self,
        harmful: PromptSpec | None = None,
        safe: PromptSpec | None = None,
        utility: UtilityTask | list[UtilityTask] | None = None,
        *,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        at_end: bool = True,
        on_validate: bool = True,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        system_prompt: str | None = None,
        refusal_strings: Sequence[str] | None = None,
        refusal_match: str = "anywhere",
        judge: Any = None,
        judge_threshold: float = 0.5,
        model_attr: str | None = None,
        tokenizer: Any = None,
        progress: bool = True,
    ) -> None:
        if int(every_n_epochs) < 0:
            raise LightningSafetyError(f"every_n_epochs={every_n_epochs} is invalid: use 0 (off) or a positive integer")
        if every_n_train_steps is not None and int(every_n_train_steps) < 0:
            raise LightningSafetyError(
                f"every_n_train_steps={every_n_train_steps} is invalid: use None/0 (off) or a positive integer"
            )
        self.evaluator = SafetyEvaluator(
            harmful=harmful,
            safe=safe,
            utility=utility,
            generation=GenerationSettings(
                max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt
            ),
            refusal=KeywordRefusal(refusal_strings or GCG_REFUSAL_STRINGS, match=refusal_match),  # type: ignore[arg-type]
            judge=judge,
            judge_threshold=judge_threshold,
        )
        self.every_n_epochs = int(every_n_epochs)
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self.at_end = at_end
        self.on_validate = on_validate
        self.model_attr = model_attr
        self.tokenizer_spec = tokenizer
        self.progress = progress
        self.last_result: EvaluationResult | None = None
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None
        self._tokenizer: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            harmful=repr(self.evaluator.harmful_spec)[:200], safe=repr(self.evaluator.safe_spec)[:200]
        )

    # ------------------------------------------------------------------ scheduling
    def _epoch_due(self, trainer: L.Trainer) -> bool:
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            # Only the validation at the end of an epoch (val_check_interval may add others).
            if self._end_of_epoch(trainer) and self._epoch_due(trainer):
                self._evaluate_and_log(trainer, pl_module)
        elif trainer.state.fn == TrainerFn.VALIDATING and self.on_validate:
            self._evaluate_and_log(trainer, pl_module)

    @staticmethod
    def _end_of_epoch(trainer: L.Trainer) -> bool:
        return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step == trainer.global_step or not self._epoch_due(trainer):
            return
        self._evaluate_and_log(trainer, pl_module)  # no validation loop ran at this epoch's end

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and self._last_step != step:
            self._evaluate_and_log(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and self._last_step != trainer.global_step:
            # Lightning forbids self.log here: the values go to callback_metrics and the loggers directly.
            values = self._evaluate(trainer, pl_module)
            for name, value in values.items():
                trainer.callback_metrics[name] = torch.tensor(value)
            for lightning_logger in trainer.loggers:
                lightning_logger.log_metrics(values, step=trainer.global_step)

    # ------------------------------------------------------------------ evaluation
    def _resolve_tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self.tokenizer_spec, trainer, pl_module, type(self).__name__)
        return self._tokenizer

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        from lightning_safety.risk.estimators import find_causal_lm

        model = find_causal_lm(pl_module, self.model_attr)
        tokenizer = self._resolve_tokenizer(trainer, pl_module)
        self.evaluator.critics = _training_critics(trainer, pl_module)
        result = self.evaluator.evaluate(
            model,
            tokenizer,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=pl_module.device,
            progress=self.progress and trainer.is_global_zero,
        )
        self.last_result = result
        self._last_step = trainer.global_step
        values = {**result.scalars(), EVALUATED_STEP_KEY: float(trainer.global_step)}
        self.history.append({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **values})
        if trainer.is_global_zero:
            summary = ", ".join(f"{name} {format_rate(r)}" for name, r in result.rates.items() if name.count("/") == 1)
            logger.info("safety evaluation at step %d: %s", trainer.global_step, summary)
            for warning in result.info.get("warnings", []):
                logger.warning(warning)
        return values

    def _evaluate_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = self._evaluate(trainer, pl_module)
        for name, value in values.items():
            # Already global (the metrics summed their states across ranks): no sync_dist.
            pl_module.log(name, value, prog_bar=name == "safety/asr", rank_zero_only=False, sync_dist=False)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = state_dict.get("last_step")


def _training_critics(trainer: L.Trainer, pl_module: L.LightningModule) -> list[Any]:
    """Judges used for training-time risk (in risk callbacks or the module's risk source)."""
    found: list[Any] = []

    def visit(obj: Any, depth: int = 0) -> None:
        if obj is None or depth > 3:
            return
        judge = getattr(obj, "judge", None)
        if judge is not None and hasattr(judge, "score"):
            found.extend([judge, getattr(judge, "name", None)])
        for child in getattr(obj, "estimators", []) or []:
            visit(child, depth + 1)
        visit(getattr(obj, "estimator", None), depth + 1)

    for callback in trainer.callbacks:
        if not isinstance(callback, SafetyEvaluationCallback):
            visit(callback)
    visit(getattr(pl_module, "risk_source", None))
    return [item for item in found if item is not None]
