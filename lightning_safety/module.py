"""The LightningModule: a trainable policy held close to a frozen safe reference where data is risky.

Per training step::

    risk  [B]  <- batch["risk"] (dataset column or risk callback), a constant, or an estimator
    beta  [B]  <- schedule(risk)
    ref_logits <- reference forward (no_grad) on the rows with beta > 0 only
    loss       <- adaptive_kl_loss(policy_logits, ref_logits, labels, beta)

Under data parallelism the loss is normalised by the number of response tokens (or, with
``normalization="example"``, of rows) of the *global* batch (one all-reduce of a few scalars per
step), so that training on N processes gives the same gradients as one process on the
concatenated batch, and the logged loss is the global one.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_safety.distributed import (
    ShardingSettings,
    any_rank,
    data_parallel_mesh,
    is_fsdp1,
    is_sharded,
    shard_model,
)
from lightning_safety.errors import DataError, LightningSafetyError, ModelLoadError
from lightning_safety.losses import AdaptiveKLOutput, ProjectedLogits, adaptive_kl_loss, check_kl_scale
from lightning_safety.models import (
    LoraSettings,
    apply_lora,
    causal_lm_logits,
    decoder_and_output_layer,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    split_forward_matches,
    supports_logits_to_keep,
)
from lightning_safety.reference import (
    Reference,
    ReferenceStrategy,
    add_reference_adapter,
    check_same_vocabulary,
    frozen_copy,
    open_reference_cache,
    precompute_reference,
    reference_fingerprint,
    resolve_reference_strategy,
)
from lightning_safety.reference_cache import DEFAULT_TOP_K, CachedTokens, ReferenceCache
from lightning_safety.risk.base import ConstantRisk, FieldRisk, RiskEstimator, check_risk
from lightning_safety.schedules import LinearRiskSchedule, RiskSchedule, schedule_from_config
from lightning_safety.tiny_model import TINY_MODEL_ALIAS

_CHECKPOINT_KEY = "lightning_safety"
_UNCHECKED = object()
_FSDP_SEGMENT, _CHECKPOINT_SEGMENT = "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."
# Order of the per-step statistics reduced across processes in one all-reduce.
_STATS = (
    "tokens", "denominator", "loss_sum", "nll_sum", "kl_sum", "kl_tokens", "beta_sum", "regularized", "risk_sum", "rows"
)


class SafeFineTuning(L.LightningModule):
    """Fine-tune a causal LM with the adaptive-KL objective toward a frozen safe reference.

    Args:
        model: the policy: hub id, local folder, ``.gguf`` file, alias (``smollm2-135m-instruct``,
            ``tiny-random-llama``), or an already built ``PreTrainedModel``.
        dtype: weights dtype when loading by name (``float32``, ``bfloat16``, ``float16``).
        lora: LoRA settings; ``None`` trains every weight (full fine-tuning).
        adapter: path of an already trained PEFT adapter to continue training.
        reference: ``auto``, ``adapter_disabled``, ``adapter_copy``, ``model_copy`` or ``separate``
            (see :mod:`lightning_safety.reference`); ``auto`` picks the one that fits.
        reference_model: the reference's name when ``reference`` is ``separate``.
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: allow models whose code lives on the hub (off unless asked).
        schedule: maps risk in [0, 1] to beta; ``None`` is the paper's ``LinearRiskSchedule(0.1, 0.9)``.
            ``ConstantBeta(0.0)`` is plain SFT, ``ConstantBeta(b)`` the constant-KL baseline.
        risk: where per-example risk comes from: ``None`` reads ``batch["risk"]`` (a dataset
            column or a risk callback), a float is the same risk for every example, or a
            :class:`~lightning_safety.risk.RiskEstimator`.
        weighting: ``convex`` (alpha = 1 - beta, the paper) or ``additive`` (alpha = 1).
        direction: ``forward`` = KL(pi_ref || pi_theta) (the paper) or ``reverse``.
        normalization: ``token`` averages the loss over the batch's response tokens (ordinary
            SFT; long responses weigh more); ``example`` averages each row's token mean over the
            rows, as the authors' one-example micro-batches do. Prefer ``example`` when risky rows
            have much longer responses than the task's (see :func:`adaptive_kl_loss`).
        kl_scale: a factor on every row's KL term, leaving the NLL's ``1 - beta`` as it is (1: the
            paper's loss; 0: risk-weighted SFT, the reference is never run). The KL toward the
            reference pulls the shared weights back everywhere, which costs task accuracy: in the
            README's zoo runs 0.1 gave back ~4 SST-2 points but alone did not hold full harmful
            fine-tuning; with ``SafetyDriftController(floor_attribute="kl_scale_floor")`` it did.
        chunk_size: compute NLL and KL over chunks of this many response tokens so that no more
            than one chunk of float32 [B, chunk, V] temporaries is alive (None: all at once).
        fused_output_layer: apply the policy's output layer inside the loss, per chunk of
            response tokens (a fused linear + loss): the policy's ``[B, T, V]`` logits are never
            stored, at the price of recomputing the output layer in backward. ``None`` turns it
            on when ``chunk_size`` is set. Used only where it reproduces the model's own logits
            (checked once on real tokens) and the policy is not sharded.
        reference_cache: folder of a reference cache (``lightning-safety precompute-reference``):
            the reference's top-k log-probabilities per response token, computed once; steps then
            read them instead of running the reference (the KL is coarse-grained to the k cached
            tokens and the rest; see :mod:`lightning_safety.reference_cache`). Opened at fit start
            (or at the first loss, or when a checkpoint is resumed), not when the model is built, so
            exporting or evaluating a checkpoint needs no cache; refused if it was built for another
            reference.
        sharding: FSDP2 settings (:class:`~lightning_safety.distributed.ShardingSettings`: mixed
            precision, resharding, CPU offload) used when the trainer's strategy is
            ``ModelParallelStrategy``: ``configure_model`` then shards the policy and the frozen
            reference layer by layer over the data-parallel mesh. Ignored by other strategies.
        optimizer: optimizer over the trainable parameters only.
        lr_scheduler: optional scheduler, stepped every optimizer step.

    Attributes:
        beta_floor: every row's beta is at least this (0 by default); set during training by
            :class:`~lightning_safety.callbacks.SafetyDriftController` while the model drifts from
            safety on its canary requests.
        kl_scale_floor: the KL term's scale is at least this (0 by default); set during training by
            ``SafetyDriftController(floor_attribute="kl_scale_floor")``: a run with a small
            ``kl_scale`` gets its KL back while the model drifts from safety.

    Example::

        module = SafeFineTuning("smollm2-135m-instruct", lora=LoraSettings(r=8))
        trainer = L.Trainer(max_steps=5)
        trainer.fit(module, datamodule=ChatSFTDataModule(train="data.jsonl", tokenizer="smollm2-135m-instruct"))
    """

    def __init__(
        self,
        model: str | nn.Module = TINY_MODEL_ALIAS,
        *,
        dtype: str | None = None,
        lora: LoraSettings | None = None,
        adapter: str | None = None,
        reference: ReferenceStrategy = "auto",
        reference_model: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        schedule: RiskSchedule | None = None,
        risk: RiskEstimator | float | None = None,
        weighting: Literal["convex", "additive"] = "convex",
        direction: Literal["forward", "reverse"] = "forward",
        normalization: Literal["token", "example"] = "token",
        kl_scale: float = 1.0,
        chunk_size: int | None = None,
        fused_output_layer: bool | None = None,
        reference_cache: str | None = None,
        sharding: ShardingSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if isinstance(lora, Mapping):  # as stored in a checkpoint's hparams
            lora = LoraSettings(**lora)
        if isinstance(schedule, Mapping):
            schedule = schedule_from_config(schedule)
        if isinstance(sharding, Mapping):
            sharding = ShardingSettings(**sharding)
        # Hyperparameters hold primitives only, so checkpoints load with torch.load(weights_only=True).
        # Callables and estimators (which may hold models) stay out; LightningCLI saves the full
        # config next to the run anyway.
        unsaved = ["optimizer", "lr_scheduler", "risk", "lora", "schedule", "sharding"]
        self.save_hyperparameters(ignore=unsaved + (["model"] if isinstance(model, nn.Module) else []))
        # A given model object is registered once, as `policy`, in configure_model (storing it as
        # an attribute now would register it twice and put its weights twice in checkpoints).
        object.__setattr__(self, "model_source", model)
        self.dtype_name = dtype
        self.lora = lora
        self.adapter = adapter
        self.reference_strategy = resolve_reference_strategy(
            reference, lora=lora is not None, adapter=adapter is not None, reference_model=reference_model
        )
        self.reference_model_name = reference_model
        self.gradient_checkpointing = gradient_checkpointing
        self.trust_remote_code = trust_remote_code
        # A private copy: schedules with EMA state must not be shared between modules.
        self.schedule = LinearRiskSchedule() if schedule is None else copy.deepcopy(schedule)
        self.hparams["lora"] = None if lora is None else asdict(lora)
        self.hparams["schedule"] = self.schedule.config()
        self.sharding = sharding
        self.reference_cache = reference_cache
        self._cache: ReferenceCache | None = None
        # Opened when training or evaluation first needs it, not when the model is built: exporting or
        # evaluating a checkpoint of a cached run must not require the cache.
        self._cache_pending = reference_cache is not None
        self._resumed_cache_digest: str | None = None
        self.hparams["sharding"] = None if sharding is None else asdict(sharding)
        self.risk_source = self._risk_estimator(risk)
        self.weighting = weighting
        self.direction = direction
        if normalization not in ("token", "example"):
            raise LightningSafetyError(f"normalization must be 'token' or 'example'; got {normalization!r}")
        self.normalization = normalization
        self.kl_scale = check_kl_scale(kl_scale)
        self.chunk_size = chunk_size
        self.fused_output_layer = chunk_size is not None if fused_output_layer is None else bool(fused_output_layer)
        self._policy_parts: Any = _UNCHECKED
        self.beta_floor = 0.0
        self.kl_scale_floor = 0.0
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None  # only for model_copy / separate
        self._keep_logits_supported = False
        self._reference_view: Reference | None = None
        self._eval_stats: Tensor | None = None
        self._start_fingerprint: str | None = None

    @staticmethod
    def _risk_estimator(risk: RiskEstimator | float | None) -> RiskEstimator:
        if risk is None:
            return FieldRisk()
        if isinstance(risk, (int, float)):
            return ConstantRisk(float(risk))
        return risk

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Load the policy, attach LoRA, and build the reference (once; delayed-init friendly)."""
        if self.policy is not None:
            return
        source = self.model_source
        if isinstance(source, str):
            policy = load_causal_lm(source, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code)
        else:
            policy = source
        reference = None
        if self.reference_strategy == "model_copy":
            # Copy before any adapter is attached: the reference is the starting model.
            reference = frozen_copy(policy)
        self._start_fingerprint = _start_fingerprint(policy)
        if self.adapter is not None:
            policy = load_adapter(policy, self.adapter, trainable=True)
        elif self.lora is not None:
            policy = apply_lora(policy, self.lora)
        if self.reference_strategy == "adapter_copy":
            add_reference_adapter(policy)
        elif self.reference_strategy == "separate":
            reference = frozen_copy(
                load_causal_lm(self.reference_model_name, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code)
            )
            check_same_vocabulary(policy, reference)
            if isinstance(source, str):  # same size is not enough: the ids must mean the same tokens
                check_same_vocabulary(
                    policy, reference, load_tokenizer(source), load_tokenizer(self.reference_model_name)
                )
        if self.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # from_pretrained returns eval mode and Lightning keeps each module's mode: the policy
        # trains (dropout on), the reference stays in eval, on purpose (Lightning would warn).
        policy.train()
        if reference is not None:
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy before this hook
        if mesh is not None:
            dp_mesh = data_parallel_mesh(mesh)
            for model in (policy, reference):
                if model is not None:
                    shard_model(model, dp_mesh, self.sharding)
        self.policy = policy
        self.reference = reference
        self._keep_logits_supported = supports_logits_to_keep(policy) and (
            reference is None or supports_logits_to_keep(reference)
        )

    @property
    def _sharded(self) -> bool:
        """Whether the policy is sharded (FSDP2 here, or FSDP1 by Lightning after configure_model)."""
        return self.policy is not None and is_sharded(self.policy)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ModelLoadError("the policy has no trainable parameters: set model.lora, or unfreeze the model")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ the step
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Policy logits [B, T, V] (the last ``logits_to_keep`` positions only when > 0)."""
        return causal_lm_logits(self.policy, input_ids, attention_mask, logits_to_keep)

    def _policy_logits(self, input_ids: Tensor, attention_mask: Tensor | None, keep: int) -> Tensor | ProjectedLogits:
        """Policy logits ``[B, T', V]`` for the loss: hidden states + output layer when fused."""
        parts = self._fused_parts(input_ids)
        if parts is None:
            return self(input_ids, attention_mask, logits_to_keep=keep)
        decoder, output_layer = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if keep:
            hidden = hidden[:, -keep:]
        return ProjectedLogits(hidden, output_layer, output_layer.out_features, trainable=True)

    def _fused_parts(self, input_ids: Tensor) -> tuple[nn.Module, nn.Module] | None:
        """The policy's decoder and output layer when the output layer is fused into the loss."""
        if not self.fused_output_layer or self._sharded:
            return None
        if self._policy_parts is _UNCHECKED:
            parts = decoder_and_output_layer(self.policy)
            if parts is not None and not split_forward_matches(self.policy, parts, input_ids[:1, :16]):
                parts = None
            self._policy_parts = parts
        return self._policy_parts

    def _logits_to_keep(self, labels: Tensor) -> int:
        """Positions from one before the earliest response token on: the output layer (a [T, V]
        matmul per row) and the logits' memory are not spent on prompt positions."""
        if not self._keep_logits_supported:
            return 0
        is_response = labels != -100
        if not bool(is_response.any()):
            return 0
        first = int(torch.where(is_response.any(dim=1), is_response.int().argmax(dim=1), labels.shape[1]).min())
        return labels.shape[1] - max(first - 1, 0)

    @property
    def frozen_reference(self) -> Reference:
        """The frozen reference, whatever the strategy (see :class:`~lightning_safety.reference.Reference`).

        Rebuilt if a strategy replaced the policy or reference module after ``configure_model``
        (FSDP1 wraps them in place). Sharded models project inside their forward, where their
        weights are gathered, so the late projection is off for them.
        """
        view = self._reference_view
        stale = view is None or view.policy is not self.policy or view.model is not self.reference
        if stale or view.late_projection == self._sharded:
            view = Reference(self.reference_strategy, self.policy, self.reference, late_projection=not self._sharded)
            self._reference_view = view
        return view

    def reference_forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int = 0
    ) -> Tensor | ProjectedLogits:
        """The frozen reference's logits ``[B, T', V]`` for a batch, exactly as a training step computes them.

        No gradients, dropout off; :class:`~lightning_safety.losses.ProjectedLogits` (final hidden
        states + output layer) where the logits can be projected per chunk in the loss; call
        ``.materialize()`` on it for a tensor. ``logits_to_keep = k > 0`` keeps the last k positions.
        """
        return self.frozen_reference.logits(input_ids, attention_mask, logits_to_keep)

    def risk_for(self, batch: Mapping[str, Any]) -> Tensor:
        """Validated per-example risk [B] in [0, 1] for a batch (fails closed on bad scores)."""
        batch_size = batch["input_ids"].shape[0]
        if not self.schedule.uses_risk and "risk" not in batch:
            # beta ignores risk (ConstantBeta): no estimator call, no risk field needed.
            return torch.zeros(batch_size, device=batch["input_ids"].device)
        risk = self.risk_source(batch, self.policy)
        return check_risk(risk, batch_size, source=type(self.risk_source).__name__)

    def compute_loss(self, batch: Mapping[str, Any], *, update_schedule: bool) -> tuple[AdaptiveKLOutput, Tensor, Tensor]:
        """Risk -> beta -> (reference forward on rows with beta > 0) -> policy forward -> loss.

        Returns the loss terms, the risk [B] and beta [B].
        """
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        risk = self.risk_for(batch)
        beta = self.schedule(risk, update=update_schedule, validated=True).to(input_ids.device)
        if self.beta_floor > 0:  # a controller tightens every row while the model drifts from safety
            beta = beta.clamp(min=float(self.beta_floor))
        keep = self._logits_to_keep(batch["labels"])
        ref_logits, ref_rows = self._reference_for(batch, beta, keep)
        policy_logits = self._policy_logits(input_ids, attention_mask, keep)
        out = adaptive_kl_loss(
            policy_logits,
            ref_logits,
            batch["labels"],
            beta,
            weighting=self.weighting,
            direction=self.direction,
            normalization=self.normalization,
            chunk_size=self.chunk_size,
            reference_rows=ref_rows,
            kl_scale=self.effective_kl_scale,
        )
        return out, risk, beta

    @property
    def effective_kl_scale(self) -> float:
        """The KL term's scale now: ``max(kl_scale, kl_scale_floor)``."""
        return max(self.kl_scale, float(self.kl_scale_floor))

    def _reference_for(
        self, batch: Mapping[str, Any], beta: Tensor, keep: int
    ) -> tuple[Tensor | ProjectedLogits | CachedTokens | None, Tensor | None]:
        """The reference's output for the rows with ``beta > 0`` and those rows (None: all rows).

        Nothing when ``kl_scale`` is 0 (no KL term).
        From the reference cache when one is set (no forward), else from the reference's forward.
        """
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if self.effective_kl_scale == 0.0:  # no KL term: nothing reads the reference
            return None, None
        rows = torch.nonzero(beta > 0).squeeze(1)
        cache = self._active_cache()
        if cache is None and self._sharded and any_rank(rows.numel() > 0, input_ids.device) and rows.numel() == 0:
            # A sharded reference gathers its weights in its forward with every rank: run it on
            # one row (beta 0, so it adds no KL) when another rank needs it and this one does not.
            rows = rows.new_zeros(1)
        if rows.numel() == 0:
            return None, None
        subset = rows.numel() < beta.numel()
        ref_rows = rows if subset else None
        if cache is not None:
            ids = batch.get("id")
            if ids is None:
                raise DataError(
                    "model.reference_cache needs the batch's example ids (batch['id']): use ChatSFTDataModule, "
                    "or add an 'id' list to your batches"
                )
            lengths = (batch["labels"][rows, 1:] != -100).sum(dim=1)
            return cache.lookup([ids[r] for r in rows.tolist()], lengths, device=input_ids.device), ref_rows
        if subset:
            input_ids = input_ids[rows]
            attention_mask = attention_mask[rows] if attention_mask is not None else None
        return self.reference_forward(input_ids, attention_mask, logits_to_keep=keep), ref_rows

    def use_reference_cache(self, cache: str | ReferenceCache | None) -> None:
        """Read the reference from ``cache`` (a folder or an open cache) from now on; None runs it again.

        E.g. precompute during the first epoch's set-up and switch on for the rest. Refuses a cache
        built for another reference or vocabulary (after ``configure_model``).
        """
        self._cache_pending = False
        if cache is None:
            self._cache = None
            return
        fingerprint = reference_fingerprint(self.reference_strategy, self.policy, self.reference, self._start_fingerprint)
        if isinstance(cache, ReferenceCache) and cache.fingerprint == fingerprint:
            self._cache = cache  # already open and checked: switching it on costs no I/O
        else:  # a folder, or another reference's cache (refused in one line by the open)
            self._cache = open_reference_cache(str(getattr(cache, "path", cache)), fingerprint, self.policy)

    def _active_cache(self) -> ReferenceCache | None:
        """The reference cache in use, opened on first need from ``reference_cache``."""
        if self._cache_pending:
            self.configure_model()
            self.use_reference_cache(self.reference_cache)
        return self._cache

    def on_fit_start(self) -> None:
        cache = self._active_cache()  # a missing or mismatched cache fails before the first step, not at it
        recorded = self._resumed_cache_digest
        if cache is not None and recorded is not None and recorded != cache.digest:
            raise LightningSafetyError(
                f"this checkpoint was trained with another reference cache (digest {recorded}, now "
                f"{cache.digest}): resume with the cache it used, or without model.reference_cache"
            )

    def precompute_reference(
        self, batches: Iterable[Mapping[str, Any]], path: str, *, top_k: int = DEFAULT_TOP_K, logprob_dtype: str = "float32"
    ) -> ReferenceCache:
        """Run the frozen reference once over ``batches`` and write a reference cache at ``path``.

        Give the folder to ``reference_cache`` of a module with the same model, adapter and
        reference strategy; its steps then read the reference's top-``top_k`` log-probabilities
        instead of running it. Batches need ``id``, ``input_ids``, ``attention_mask`` and ``labels``.
        """
        self.configure_model()
        fingerprint = reference_fingerprint(self.reference_strategy, self.policy, self.reference, self._start_fingerprint)
        if fingerprint is None:
            raise LightningSafetyError("the reference's weights are not materialised (delayed initialisation): load real weights first")
        return precompute_reference(
            self.frozen_reference, batches, path, fingerprint=fingerprint, top_k=top_k, logprob_dtype=logprob_dtype
        )

    def _local_stats(self, out: AdaptiveKLOutput, risk: Tensor, beta: Tensor) -> Tensor:
        tokens = out.tokens_per_example.float()
        regularized = beta > 0
        kl_tokens = (tokens * regularized).sum()
        values = {
            "tokens": tokens.sum(),
            "denominator": out.denominator,
            "loss_sum": out.loss_sum.detach(),
            "nll_sum": (out.nll_per_example * tokens).sum(),
            "kl_sum": (out.kl_per_example * tokens * regularized).sum(),  # beta-0 rows: no KL (lockstep rows)
            "kl_tokens": kl_tokens,
            "beta_sum": beta.sum(),
            "regularized": regularized.float().sum(),
            "risk_sum": risk.sum(),
            "rows": torch.tensor(float(beta.numel()), device=beta.device),
        }
        return torch.stack([values[name].float().to(self.device) for name in _STATS])

    def _global_sum(self, stats: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return stats
        return self.trainer.strategy.reduce(stats.clone(), reduce_op="sum")

    @staticmethod
    def _summary(stats: Tensor) -> dict[str, Tensor]:
        s = dict(zip(_STATS, stats))
        return {
            "loss": s["loss_sum"] / s["denominator"],
            "nll": s["nll_sum"] / s["tokens"],
            "kl": s["kl_sum"] / s["kl_tokens"].clamp(min=1.0),
            "beta_mean": s["beta_sum"] / s["rows"],
            "regularized_fraction": s["regularized"] / s["rows"],
            "risk_mean": s["risk_sum"] / s["rows"],
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """One optimisation step's loss plus the per-example values it was computed from.

        The returned dict is the per-example contract that callbacks read from the ``outputs`` of
        ``on_train_batch_end`` (e.g. :class:`~lightning_safety.callbacks.audit.RiskAuditLog`).
        Every entry but ``loss`` is a detached tensor of shape [B], one value per row of this
        process's batch, in batch order:

        * ``loss``: the scalar Lightning optimises (normalised by the global token count);
        * ``risk``: the validated risk in [0, 1] the schedule was given;
        * ``beta``: the KL weight of each row (``beta > 0`` rows are regularized);
        * ``kl``: mean per-token KL to the reference (0 where ``beta == 0``: no reference forward);
        * ``nll``: mean per-token NLL of the response;
        * ``tokens``: number of response tokens (int64).

        Example::

            out = module.training_step(batch, 0)
            out["loss"].backward()
            risky = out["beta"] > 0
        """
        out, risk, beta = self.compute_loss(batch, update_schedule=True)
        stats = self._global_sum(self._local_stats(out, risk, beta))
        world_size = 1 if self._trainer is None else self.trainer.world_size
        # DDP averages gradients over processes; scaling by world_size / the global denominator
        # (tokens or rows) makes the result the mean over the global batch, as one process would.
        loss = out.loss_sum * (world_size / stats[_STATS.index("denominator")])
        summary = self._summary(stats)
        batch_size = int(beta.numel())
        self.log("train/loss", summary.pop("loss"), prog_bar=True, batch_size=batch_size)
        for name, value in summary.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return {
            "loss": loss,
            "risk": risk.detach(),
            "beta": beta.detach(),
            "kl": out.kl_per_example.detach(),
            "nll": out.nll_per_example.detach(),
            "tokens": out.tokens_per_example.detach(),
        }

    def _accumulate_eval(self, batch: Mapping[str, Any]) -> None:
        out, risk, beta = self.compute_loss(batch, update_schedule=False)
        stats = self._local_stats(out, risk, beta)
        self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats

    def _log_eval(self, prefix: str) -> None:
        """Token-weighted means over the whole evaluation set and every process."""
        if self._eval_stats is None:
            return
        summary = self._summary(self._global_sum(self._eval_stats))
        for name, value in summary.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "loss")
        self._eval_stats = None

    def on_validation_epoch_start(self) -> None:
        self._eval_stats = None

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._accumulate_eval(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self._eval_stats = None

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._accumulate_eval(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Per-example risk, beta, NLL and KL to the reference (for auditing a dataset)."""
        out, risk, beta = self.compute_loss(batch, update_schedule=False)
        return {
            "id": batch.get("id"),
            "risk": risk.cpu(),
            "beta": beta.cpu(),
            "nll": out.nll_per_example.cpu(),
            "kl": out.kl_per_example.cpu(),
        }

    # ------------------------------------------------------------------ checkpoints
    def _frozen_names(self) -> set[str]:
        """Names of frozen weights (reference, LoRA base): identical to the model as loaded.

        Also without FSDP1's and activation checkpointing's wrapper segments, which their state
        dict hooks remove from the keys."""
        names = {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return names | {name.replace(_FSDP_SEGMENT, "").replace(_CHECKPOINT_SEGMENT, "") for name in names}

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The weights training changes (trainable parameters and buffers), never the frozen ones.

        The frozen base and the reference are the model as loaded: checkpoints (full or sharded,
        which save and load through this) leave them out, and :meth:`load_state_dict` fills them
        from the model. ``self.policy.state_dict()`` is the whole policy. Under FSDP1 the state
        dict is whole (FSDP1's own hooks need every key of a flat parameter);
        :meth:`on_save_checkpoint` then drops the frozen weights from the checkpoint.
        """
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if is_fsdp1(self):
            return state
        for name in self._frozen_names():
            state.pop(prefix + name, None)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load trainable weights and buffers; frozen weights missing from ``state_dict`` keep their values.

        With ``strict`` every trainable weight and buffer must be given and nothing unknown may be.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = self._frozen_names()
        missing = [key for key in result.missing_keys if key not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing[:8]}, "
                f"unexpected keys {list(result.unexpected_keys)[:8]}"
            )
        result.missing_keys[:] = missing
        return result

    def configure_callbacks(self) -> list[L.Callback]:
        """Checkpoints written atomically (temporary file + rename in their folder), for any trainer."""
        from lightning_safety.checkpointing import AtomicCheckpoints

        return [AtomicCheckpoints()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        frozen = self._frozen_names()
        for key in frozen & set(state or ()):  # a state dict gathered elsewhere: leave the frozen weights out
            del state[key]
        checkpoint[_CHECKPOINT_KEY] = {
            "schedule": self.schedule.state_dict(),
            "frozen_keys_omitted": len(frozen),
            "reference_strategy": self.reference_strategy,
            # The model training started from: resuming on another one would put these weights (or this
            # adapter) on top of a different base and reference, silently.
            "start_model": self.hparams.get("model"),
            "start_fingerprint": self._start_fingerprint,
            "reference_cache_digest": None if self._cache is None else self._cache.digest,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        extra = checkpoint.get(_CHECKPOINT_KEY)
        if extra is None:
            raise LightningSafetyError(
                "this checkpoint was not written by SafeFineTuning (no 'lightning_safety' entry): "
                "load it with the module that wrote it"
            )
        recorded, current = extra.get("start_fingerprint"), self._start_fingerprint
        if recorded and current and recorded != current:
            raise LightningSafetyError(
                f"this checkpoint was trained from model {extra.get('start_model')!r} (fingerprint {recorded[:12]}...), "
                f"not from {self.hparams.get('model')!r} ({current[:12]}...): resume with the model it started from, "
                "or start a new run without the checkpoint"
            )
        # Checked when the cache is opened for training (on_fit_start): exporting needs no cache.
        self._resumed_cache_digest = extra.get("reference_cache_digest")
        self.schedule.load_state_dict(extra["schedule"])
        # Frozen weights were left out when saving: load_state_dict keeps them as loaded.


def _start_fingerprint(model: nn.Module) -> str | None:
    """The fingerprint of the model training starts from (None when its weights are not materialised yet)."""
    from lightning_safety.risk.probe import model_fingerprint

    if any(parameter.is_meta for parameter in model.parameters()):
        return None
    return model_fingerprint(model)
