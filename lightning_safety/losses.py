"""The adaptive-KL loss and the risk schedules that set its per-example weight.

The method ("Learning to Stay Safe", arXiv 2602.17546) fine-tunes a policy ``pi_theta`` with a
per-example mixture of the usual next-token NLL and a KL term toward a frozen, safe reference
``pi_ref``. Each example ``b`` gets a weight ``beta_b`` in [0, 1] from a :class:`RiskSchedule`
applied to its risk score ``s_b`` in [0, 1]: risky examples are pulled toward the reference,
harmless ones are learned almost freely.

Shapes used below: ``B`` batch rows, ``T`` sequence length, ``V`` vocabulary, ``R`` rows that have
reference logits, ``N`` response tokens in the batch, ``M`` response tokens of rows with a
reference (``M <= N``).
"""

from __future__ import annotations

import abc
import functools
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_safety.errors import (
    DataError,
    IncompatibleReferenceError,
    LightningSafetyError,
    RiskError,
)

__all__ = [
    "AdaptiveKLOutput",
    "adaptive_kl_loss",
    "ProjectedLogits",
    "validate_risk",
    "RiskSchedule",
    "LinearRiskSchedule",
    "JudgeScoreSchedule",
    "ThresholdRiskSchedule",
    "ConstantBeta",
    "schedule_from_config",
]

Weighting = Literal["convex", "additive"]
Direction = Literal["forward", "reverse"]
Normalization = Literal["token", "example"]


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveKLOutput:
    """Result of :func:`adaptive_kl_loss`. Only ``loss`` and ``loss_sum`` carry gradients.

    Attributes:
        loss: scalar, ``loss_sum / denominator``.
        nll: scalar, unweighted mean NLL over all response tokens.
        kl: scalar, unweighted mean KL over the response tokens of rows with reference logits
            (0 when no row has them).
        nll_per_example: ``[B]`` mean NLL over each row's response tokens (0 for a row without).
        kl_per_example: ``[B]`` mean KL per row (0 for rows without reference logits).
        tokens_per_example: ``[B]`` int64 number of response tokens per row.
        alpha: ``[B]`` weight of the NLL term.
        beta: ``[B]`` weight of the KL term.
        loss_sum: scalar, the weighted sum before normalisation (see :func:`adaptive_kl_loss`);
            lets callers renormalise by the denominator summed across data-parallel ranks.
        num_tokens: scalar int64, ``N``.
        denominator: scalar int64, what ``loss_sum`` is divided by: ``N`` ("token"
            normalisation) or the number of rows with response tokens ("example").
    """

    loss: Tensor
    nll: Tensor
    kl: Tensor
    nll_per_example: Tensor
    kl_per_example: Tensor
    tokens_per_example: Tensor
    alpha: Tensor
    beta: Tensor
    loss_sum: Tensor
    num_tokens: Tensor
    denominator: Tensor


@dataclass(frozen=True)
class _TokenPlan:
    """Which (row, position) pairs are response tokens; rows with a reference come first.

    Putting the ``M`` tokens that need a KL first lets every chunk compute its KL on a prefix,
    and lets the reference logits be split with the same chunk size as the policy logits.
    """

    rows: Tensor  # [N] int64 policy row of each response token
    positions: Tensor  # [N] int64 logit position t (its logits predict labels[:, t + 1])
    targets: Tensor  # [N] int64 label id predicted at that position
    ref_rows: Tensor  # [M] int64 row of reference_logits for the first M tokens
    tokens_per_example: Tensor  # [B] int64

    @property
    def num_tokens(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_ref_tokens(self) -> int:
        return int(self.ref_rows.shape[0])


class ProjectedLogits:
    """Logits ``[R, T, V]`` held as final hidden states ``[R, T, H]`` plus the output layer.

    Indexing (``logits[rows, positions]``) applies the output layer to the selected hidden states
    only, so the loss, which asks for one chunk of response tokens at a time, never materialises
    a float32 ``[R, T, V]`` tensor for the reference: with ``chunk_size`` the reference costs one
    ``[chunk, V]`` block, like the policy's own temporaries. Give it only frozen, gradient-free
    parts (the reference's hidden states computed under ``no_grad`` and a frozen output layer
    that has no post-processing such as logit soft-capping).

    Args:
        hidden: ``[R, T, H]`` final hidden states (after the final norm).
        output_layer: maps ``[..., H]`` to ``[..., V]`` logits (the model's ``lm_head``).
        vocab_size: ``V``.
    """

    def __init__(self, hidden: Tensor, output_layer: Callable[[Tensor], Tensor], vocab_size: int) -> None:
        self.hidden = hidden.detach()
        self.output_layer = output_layer
        self.vocab_size = int(vocab_size)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:2], self.vocab_size))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def dim(self) -> int:
        return 3

    def is_floating_point(self) -> bool:
        return True

    def detach(self) -> "ProjectedLogits":
        return self

    def __getitem__(self, index: Any) -> Tensor:
        with torch.no_grad():
            return self.output_layer(self.hidden[index])

    def materialize(self) -> Tensor:
        """The full ``[R, T, V]`` logits (for tests and small inputs)."""
        return self[:, :]


def adaptive_kl_loss(
    policy_logits: Tensor,
    reference_logits: Tensor | ProjectedLogits | None,
    labels: Tensor,
    beta: Tensor | float,
    *,
    weighting: Weighting = "convex",
    direction: Direction = "forward",
    normalization: Normalization = "token",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reference_rows: Tensor | None = None,
) -> AdaptiveKLOutput:
    """Mixture of NLL and KL toward a reference, weighted per example.

    Follows the Hugging Face causal-LM convention: ``labels`` has the input's length and the
    logits at position ``t`` predict ``labels[:, t + 1]``; a response token is a shifted label
    that is not ``ignore_index``. For each response token (in float32)::

        nll_bt = -log pi_theta(y_bt)
        kl_bt  = KL(pi_ref || pi_theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))   forward
        kl_bt  = KL(pi_theta || pi_ref) = sum_v p_theta(v) (log p_theta(v) - log p_ref(v)) reverse

        token:    loss = sum_{b, t} (alpha_b nll_bt + beta_b kl_bt) / N
        example:  loss = sum_b (alpha_b mean_t nll_bt + beta_b mean_t kl_bt) / B'

    with ``alpha_b = 1 - beta_b`` ("convex") or ``1`` ("additive"), ``N`` the number of response
    tokens in the whole batch and ``B'`` the number of rows that have response tokens. At batch
    size 1 both are the authors' per-example loss ``alpha mean_t(nll) + beta mean_t(kl)``. Over a
    batch, "token" (ordinary token-mean SFT) lets longer responses weigh more; "example" gives
    every row the same weight, which is what the authors' micro-batches of one example amount to
    under gradient accumulation. The difference matters when risky rows have long responses and
    the task's rows short ones (a 2-token label against a 90-token harmful answer): under "token"
    the KL on the few long risky rows can outweigh the whole task. With ``beta == 0`` everywhere
    "token" is plain SFT cross-entropy.
    ``beta`` is detached: the weights are constants, not learned. The reference logits are also
    detached (the reference is frozen). Logits must be finite.

    Only response tokens are processed: they are gathered first, so long prompts cost nothing
    beyond the gather, and the KL is computed only for rows that have reference logits. Finding
    them and validating the inputs costs a few host-device syncs per call.

    Args:
        policy_logits: ``[B, T, V]`` logits of the policy, any float dtype.
        reference_logits: ``[R, T, V]`` logits of the reference for the rows in
            ``reference_rows`` (all ``B`` rows when that is None), or None when every beta is 0;
            or :class:`ProjectedLogits` (hidden states + output layer), projected per chunk.
        labels: ``[B, T]`` integer labels, ``ignore_index`` on prompt and padding tokens. The
            logits may cover only the last ``T' < T`` positions (Hugging Face ``logits_to_keep``:
            no logits for the prompt); the labels are then aligned to those positions, and every
            response token must still be predicted by a kept position.
        beta: ``[B]`` per-example KL weight in [0, 1], or one float for every row.
        weighting: "convex" (``alpha = 1 - beta``) or "additive" (``alpha = 1``).
        direction: "forward" for ``KL(pi_ref || pi_theta)``, "reverse" for
            ``KL(pi_theta || pi_ref)``.
        normalization: "token" (mean over the batch's response tokens) or "example" (mean of
            each row's token mean over the rows).
        ignore_index: label value of tokens that are not trained on.
        chunk_size: if set, process the gathered response tokens ``chunk_size`` at a time (a
            chunk may span rows), each chunk under activation checkpointing when gradients are
            needed, so that at most one chunk's float32 ``[chunk_size, V]`` intermediates are
            alive in forward and backward; what stays alive for backward is only the gathered
            ``[N, V]`` policy logits in their own dtype. Results equal the unchunked path up to
            float32 rounding. Without it, a few float32 ``[N, V]`` tensors are kept for backward.
        reference_rows: ``[R]`` int64, the policy row of each ``reference_logits`` row. Rows not
            listed get no KL and must have ``beta == 0``.

    Returns:
        An :class:`AdaptiveKLOutput`.

    Raises:
        RiskError: beta is not finite, outside [0, 1] or mis-shaped, or a row with beta > 0 has
            no reference logits.
        DataError: the batch has no response tokens, or shapes or label ids are invalid.
        IncompatibleReferenceError: the reference's vocabulary size differs from the policy's.
    """
    labels = _align_labels(policy_logits, labels, ignore_index)
    batch, seq_len, vocab = _check_logits_and_labels(policy_logits, labels)
    _check_options(weighting, direction, chunk_size, normalization)
    device = policy_logits.device
    beta_t = _as_beta(beta, batch, device)
    alpha_t = 1.0 - beta_t if weighting == "convex" else torch.ones_like(beta_t)
    ref_index = _reference_index(reference_logits, reference_rows, beta_t, seq_len, vocab)
    plan = _plan_tokens(labels, ref_index, ignore_index, vocab)
    nll_tok, kl_tok = _token_losses_chunked(
        policy_logits, reference_logits, plan, direction, chunk_size
    )
    return _assemble(nll_tok, kl_tok, plan, alpha_t, beta_t, normalization)


def _align_labels(policy_logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Labels of the last ``T'`` positions when the logits cover only those (``logits_to_keep``)."""
    if not isinstance(policy_logits, Tensor) or not isinstance(labels, Tensor):
        return labels
    if policy_logits.dim() != 3 or labels.dim() != 2 or policy_logits.shape[1] >= labels.shape[1]:
        return labels
    kept = policy_logits.shape[1]
    dropped = labels.shape[1] - kept
    # The first kept position predicts labels[:, dropped + 1]: labels up to `dropped` are unreachable.
    if bool((labels[:, : dropped + 1] != ignore_index).any()):
        raise DataError(
            f"policy_logits cover the last {kept} of {labels.shape[1]} positions but response tokens "
            "start earlier: keep logits from one position before the first response token"
        )
    return labels[:, dropped:]


def _check_logits_and_labels(policy_logits: Tensor, labels: Tensor) -> tuple[int, int, int]:
    """Validate ``[B, T, V]`` float logits against ``[B, T]`` integer labels; return B, T, V."""
    if not isinstance(policy_logits, Tensor) or policy_logits.dim() != 3:
        is_tensor = isinstance(policy_logits, Tensor)
        got = tuple(policy_logits.shape) if is_tensor else type(policy_logits).__name__
        raise DataError(
            f"policy_logits must be a [B, T, V] tensor; got {got}: pass the model's logits"
        )
    if not policy_logits.is_floating_point():
        raise DataError(f"policy_logits must be floating point; got {policy_logits.dtype}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, Tensor) else type(labels)
        raise DataError(f"labels must be an integer tensor; got {got}: pass token ids (int64)")
    if tuple(labels.shape) != tuple(policy_logits.shape[:2]):
        raise DataError(
            f"labels shape {tuple(labels.shape)} does not match policy_logits [B, T] = "
            f"{tuple(policy_logits.shape[:2])}: labels must have the input's shape (unshifted)"
        )
    batch, seq_len, vocab = policy_logits.shape
    return batch, seq_len, vocab


def _check_options(
    weighting: str, direction: str, chunk_size: int | None, normalization: str = "token"
) -> None:
    """Validate the string options and ``chunk_size``."""
    if weighting not in ("convex", "additive"):
        raise LightningSafetyError(f"weighting must be 'convex' or 'additive'; got {weighting!r}")
    if direction not in ("forward", "reverse"):
        raise LightningSafetyError(f"direction must be 'forward' or 'reverse'; got {direction!r}")
    if normalization not in ("token", "example"):
        raise LightningSafetyError(f"normalization must be 'token' or 'example'; got {normalization!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise LightningSafetyError(
            f"chunk_size must be a positive integer or None; got {chunk_size!r}"
        )


def _as_beta(beta: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Return a detached float32 ``[B]`` beta, checked to be finite and in [0, 1]."""
    if isinstance(beta, Tensor):
        if beta.dim() == 0:
            beta = beta.reshape(1).expand(batch)
        if tuple(beta.shape) != (batch,):
            raise RiskError(
                f"beta must have shape [B] = ({batch},); got {tuple(beta.shape)}: "
                "pass one beta per batch row or a single float"
            )
        beta_t = beta.detach().to(device=device, dtype=torch.float32)
    elif isinstance(beta, (int, float)) and not isinstance(beta, bool):
        beta_t = torch.full((batch,), float(beta), device=device, dtype=torch.float32)
    else:
        raise RiskError(f"beta must be a float or a [B] tensor; got {type(beta).__name__}")
    non_finite, out_of_range = _count_bad(beta_t)
    if non_finite or out_of_range:
        raise RiskError(
            f"beta must be finite and in [0, 1]; got {non_finite} non-finite and {out_of_range} "
            "out-of-range values: check the risk schedule's output"
        )
    return beta_t


def _count_bad(values: Tensor) -> tuple[int, int]:
    """Count non-finite values and finite values outside [0, 1] (one host sync)."""
    finite = torch.isfinite(values)
    outside = finite & ((values < 0) | (values > 1))
    counts = torch.stack([(~finite).sum(), outside.sum()]).tolist()
    return int(counts[0]), int(counts[1])


def _reference_index(
    reference_logits: Tensor | ProjectedLogits | None,
    reference_rows: Tensor | None,
    beta: Tensor,
    seq_len: int,
    vocab: int,
) -> Tensor:
    """Map each policy row to its ``reference_logits`` row: ``[B]`` int64, -1 where none.

    Also checks that every row with ``beta > 0`` has reference logits.
    """
    batch = beta.shape[0]
    device = beta.device
    ref_index = torch.full((batch,), -1, dtype=torch.long, device=device)
    if reference_logits is None:
        if reference_rows is not None:
            raise LightningSafetyError(
                "reference_rows was given without reference_logits: pass both or neither"
            )
    else:
        rows = _check_reference(reference_logits, reference_rows, batch, seq_len, vocab)
        ref_index[rows.to(device)] = torch.arange(rows.shape[0], device=device)
    missing = ((ref_index < 0) & (beta > 0)).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise RiskError(
            f"{len(missing)} row(s) have beta > 0 but no reference logits (rows {shown}): "
            "pass the reference model's logits for them or give them beta = 0"
        )
    return ref_index


def _check_reference(
    reference_logits: Tensor, reference_rows: Tensor | None, batch: int, seq_len: int, vocab: int
) -> Tensor:
    """Validate ``[R, T, V]`` reference logits and ``[R]`` rows; return the rows (int64)."""
    if reference_logits.dim() != 3 or not reference_logits.is_floating_point():
        raise DataError(
            f"reference_logits must be a float [R, T, V] tensor; got {reference_logits.dtype} "
            f"{tuple(reference_logits.shape)}"
        )
    num_ref, ref_len, ref_vocab = reference_logits.shape
    if ref_vocab != vocab:
        raise IncompatibleReferenceError(
            f"reference vocabulary size {ref_vocab} differs from the policy's {vocab}: "
            "use a reference with the same tokenizer"
        )
    if ref_len != seq_len:
        raise DataError(
            f"reference_logits length {ref_len} differs from policy_logits length {seq_len}: "
            "run the reference on the same input_ids"
        )
    if reference_rows is None:
        if num_ref != batch:
            raise DataError(
                f"reference_logits has {num_ref} rows but the batch has {batch}: "
                "pass reference_rows to say which rows they belong to"
            )
        return torch.arange(batch, device=reference_logits.device)
    if (
        reference_rows.dim() != 1
        or reference_rows.is_floating_point()
        or reference_rows.dtype == torch.bool
        or reference_rows.shape[0] != num_ref
    ):
        raise DataError(
            f"reference_rows must be an int64 [R] tensor with R = {num_ref}; got "
            f"{reference_rows.dtype} {tuple(reference_rows.shape)}"
        )
    rows = reference_rows.long()
    if num_ref and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise DataError(f"reference_rows must be row indices in [0, {batch}); got {rows.tolist()}")
    if torch.unique(rows).shape[0] != num_ref:
        raise DataError(f"reference_rows must not repeat a row; got {rows.tolist()}")
    return rows


def _plan_tokens(labels: Tensor, ref_index: Tensor, ignore_index: int, vocab: int) -> _TokenPlan:
    """Find the response tokens (shifted labels != ignore_index), reference rows first."""
    targets_all = labels[:, 1:]  # [B, T-1]: position t predicts labels[:, t + 1]
    mask = targets_all != ignore_index  # [B, T-1]
    has_ref = (ref_index >= 0)[:, None]  # [B, 1]
    rows_ref, pos_ref = (mask & has_ref).nonzero(as_tuple=True)
    rows_rest, pos_rest = (mask & ~has_ref).nonzero(as_tuple=True)
    rows = torch.cat([rows_ref, rows_rest])
    positions = torch.cat([pos_ref, pos_rest])
    if rows.shape[0] == 0:
        raise DataError(
            "the batch has no response tokens (every shifted label is ignore_index): "
            "check that responses survive truncation and are not masked out"
        )
    targets = targets_all[rows, positions].long()
    bad = int(((targets < 0) | (targets >= vocab)).sum())
    if bad:
        raise DataError(
            f"{bad} label id(s) are outside the vocabulary [0, {vocab}): "
            "check that the tokenizer matches the model and that ignore_index is right"
        )
    return _TokenPlan(
        rows=rows,
        positions=positions,
        targets=targets,
        ref_rows=ref_index[rows_ref],
        tokens_per_example=mask.sum(dim=1),
    )


def _token_losses(
    policy: Tensor,
    targets: Tensor,
    reference_logits: Tensor | ProjectedLogits | None,
    ref_rows: Tensor,
    ref_positions: Tensor,
    direction: Direction,
) -> tuple[Tensor, Tensor]:
    """Per-token NLL and KL for one chunk of ``n`` response tokens, in float32.

    Args:
        policy: ``[n, V]`` policy logits of the chunk's tokens.
        targets: ``[n]`` int64 label ids.
        reference_logits: ``[R, T, V]`` detached reference logits, or None.
        ref_rows, ref_positions: ``[m]`` int64 (``m <= n``): where the reference logits of the
            chunk's first ``m`` tokens are. The reference is indexed here rather than gathered
            up front, so no copy of it outlives the chunk (it needs no gradient).

    Returns:
        ``nll [n]`` and ``kl [m]``.
    """
    x = policy.float()
    lse = torch.logsumexp(x, dim=-1)  # [n]
    # NLL via logsumexp and a gather: no [n, V] log-softmax for rows that need no KL.
    nll = lse - x.gather(-1, targets[:, None]).squeeze(-1)
    m = ref_rows.shape[0]
    if reference_logits is None or m == 0:
        return nll, x.new_zeros(0)
    logp = x[:m] - lse[:m, None]  # [m, V]
    logq = torch.log_softmax(reference_logits[ref_rows, ref_positions].float(), dim=-1)  # [m, V]
    if direction == "forward":
        kl = (logq.exp() * (logq - logp)).sum(dim=-1)
    else:
        kl = (logp.exp() * (logp - logq)).sum(dim=-1)
    return nll, kl


def _token_losses_chunked(
    policy_logits: Tensor,
    reference_logits: Tensor | ProjectedLogits | None,
    plan: _TokenPlan,
    direction: Direction,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Gather the response tokens and compute ``nll [N]`` and ``kl [M]``, chunk by chunk.

    The policy's response tokens are gathered once, ``[N, V]`` in the logits' dtype: gathering
    inside each chunk instead would make every chunk's backward zero-fill a full ``[B, T, V]``
    gradient. Everything float32 and ``V``-wide is then made one chunk at a time.
    """
    policy = policy_logits[plan.rows, plan.positions]  # [N, V], logits dtype
    reference = reference_logits.detach() if reference_logits is not None else None  # frozen
    ref_positions = plan.positions[: plan.num_ref_tokens]
    fn = functools.partial(_token_losses, direction=direction)
    if chunk_size is None:
        return fn(policy, plan.targets, reference, plan.ref_rows, ref_positions)

    # split (not slicing) so backward concatenates the chunk gradients once instead of
    # zero-filling an [N, V] gradient per chunk.
    policy_chunks = policy.split(chunk_size)
    target_chunks = plan.targets.split(chunk_size)
    # Reference tokens come first, so chunk i's KL tokens are chunk i of these [M] tensors.
    ref_row_chunks = plan.ref_rows.split(chunk_size)
    ref_pos_chunks = ref_positions.split(chunk_size)
    empty = plan.ref_rows.new_zeros(0)
    recompute = torch.is_grad_enabled() and policy.requires_grad
    nll_parts, kl_parts = [], []
    for i, (p_chunk, t_chunk) in enumerate(zip(policy_chunks, target_chunks)):
        has_ref = i < len(ref_row_chunks)
        args = (
            p_chunk,
            t_chunk,
            reference,
            ref_row_chunks[i] if has_ref else empty,
            ref_pos_chunks[i] if has_ref else empty,
        )
        if recompute:
            # Keeps only the inputs; backward recomputes this chunk's [chunk, V] tensors.
            nll, kl = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            nll, kl = fn(*args)
        nll_parts.append(nll)
        kl_parts.append(kl)
    return torch.cat(nll_parts), torch.cat(kl_parts)


def _assemble(
    nll_tok: Tensor,
    kl_tok: Tensor,
    plan: _TokenPlan,
    alpha: Tensor,
    beta: Tensor,
    normalization: Normalization = "token",
) -> AdaptiveKLOutput:
    """Weight and reduce the per-token ``nll [N]`` and ``kl [M]`` into an output."""
    num_tokens = plan.num_tokens
    num_ref = plan.num_ref_tokens
    ref_token_rows = plan.rows[:num_ref]
    denom = plan.tokens_per_example.clamp_min(1).to(torch.float32)  # [B]
    nll_weight, kl_weight = alpha, beta
    if normalization == "example":
        # Each token carries 1 / (its row's token count): a row's tokens sum to its token mean.
        nll_weight, kl_weight = alpha / denom, beta / denom
        denominator = (plan.tokens_per_example > 0).sum()
    else:
        denominator = torch.tensor(num_tokens, device=beta.device)
    loss_sum = (nll_weight[plan.rows] * nll_tok).sum() + (kl_weight[ref_token_rows] * kl_tok).sum()
    nll_d, kl_d = nll_tok.detach(), kl_tok.detach()
    zeros = torch.zeros_like(beta)
    return AdaptiveKLOutput(
        loss=loss_sum / denominator,
        nll=nll_d.mean(),
        kl=kl_d.mean() if num_ref else zeros.new_zeros(()),
        nll_per_example=zeros.index_add(0, plan.rows, nll_d) / denom,
        kl_per_example=zeros.index_add(0, ref_token_rows, kl_d) / denom,
        tokens_per_example=plan.tokens_per_example,
        alpha=alpha,
        beta=beta,
        loss_sum=loss_sum,
        num_tokens=torch.tensor(num_tokens, dtype=torch.long, device=beta.device),
        denominator=denominator.to(torch.long),
    )


# --------------------------------------------------------------------------------------------
# Risk schedules: risk s in [0, 1] -> beta in [0, 1]
# --------------------------------------------------------------------------------------------


def validate_risk(risk: Tensor) -> Tensor:
    """Check that ``risk`` is a non-empty 1-D float tensor of finite values in [0, 1].

    Args:
        risk: ``[B]`` per-example risk scores.

    Returns:
        ``risk`` as float32 ``[B]`` on its device.

    Raises:
        RiskError: wrong type, shape or dtype, or NaN / infinite / out-of-range values.
    """
    if not isinstance(risk, Tensor):
        raise RiskError(f"risk must be a 1-D float tensor; got {type(risk).__name__}")
    if risk.dim() != 1 or risk.shape[0] == 0 or not risk.is_floating_point():
        raise RiskError(
            f"risk must be a non-empty 1-D float tensor [B]; got {risk.dtype} "
            f"{tuple(risk.shape)}: pass one risk score in [0, 1] per example"
        )
    nan = torch.isnan(risk)
    outside = ~nan & ((risk < 0) | (risk > 1))  # infinities count as out of range
    n_nan, n_out = (int(c) for c in torch.stack([nan.sum(), outside.sum()]).tolist())
    if n_nan or n_out:
        raise RiskError(
            f"risk must be finite numbers in [0, 1]; got {n_nan} NaN and {n_out} out-of-range "
            "values: check the estimator or the dataset's risk field"
        )
    return risk.to(torch.float32)


def _check_unit(name: str, value: float) -> float:
    """Return ``value`` as a float after checking that it is a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RiskError(f"{name} must be a number in [0, 1]; got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RiskError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def _check_order(low_name: str, low: float, high_name: str, high: float) -> None:
    """Require ``low <= high``."""
    if low > high:
        raise RiskError(
            f"{low_name} ({low}) must not exceed {high_name} ({high}): swap them or fix the config"
        )


class RiskSchedule(abc.ABC):
    """Maps per-example risk ``s [B]`` in [0, 1] to the KL weight ``beta [B]`` in [0, 1].

    Calling a schedule validates the risk (:func:`validate_risk`) and returns float32 ``beta``
    on the risk's device. Stateful schedules (EMA) update their state only when called with
    ``update=True``; pass ``update=False`` from validation so it does not disturb training.
    """

    uses_risk: bool = True
    """False for schedules whose beta ignores risk (a batch then needs no risk score)."""

    def __call__(self, risk: Tensor, *, update: bool = True) -> Tensor:
        """Return ``beta [B]`` (float32) for ``risk [B]``."""
        return self._beta(validate_risk(risk), update=update).to(torch.float32)

    @abc.abstractmethod
    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        """Compute ``beta [B]`` from validated float32 ``risk [B]``."""

    @property
    @abc.abstractmethod
    def min_beta(self) -> float:
        """The smallest beta this schedule can output (0 means the reference can be skipped)."""

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: primitives only, rebuilt by :func:`schedule_from_config`.

        Init arguments are stored as same-named attributes by every schedule.
        """
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint resume (empty for stateless schedules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; unknown keys raise :class:`RiskError`."""
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise RiskError(
                f"{type(self).__name__} state has unknown keys {unknown}: "
                "the checkpoint was saved with a different risk schedule"
            )


class LinearRiskSchedule(RiskSchedule):
    """``beta = beta_min + (beta_max - beta_min) * s``, optionally on an EMA-smoothed risk.

    With ``ema = lam`` the risk is smoothed with the paper's recurrence
    ``s~_t = lam * s~_{t-1} + (1 - lam) * s_t`` (first step ``s~_0 = s_0``), extended to a batch
    of ``B`` examples so that rows keep their own risk:

    * ``prev`` = the stored state, or ``mean(s)`` on the first call;
    * ``s~_i = lam * prev + (1 - lam) * s_i`` for every row ``i``;
    * if ``update``: state <- ``lam * prev + (1 - lam) * mean(s)`` (= ``mean(s~)``).

    At batch size 1 this is exactly the paper's recurrence. The state is a Python float per
    process (data-parallel ranks smooth their own batches).

    Example:
        >>> LinearRiskSchedule(0.1, 0.9)(torch.tensor([0.0, 0.5, 1.0]))
        tensor([0.1000, 0.5000, 0.9000])
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 0.9, ema: float | None = None):
        self.beta_min = _check_unit("beta_min", beta_min)
        self.beta_max = _check_unit("beta_max", beta_max)
        _check_order("beta_min", self.beta_min, "beta_max", self.beta_max)
        if ema is not None:
            ema = _check_unit("ema", ema)
            if ema >= 1.0:
                raise RiskError(f"ema must be in [0, 1); got {ema}: 1 would never update the risk")
        self.ema = ema
        self._state: float | None = None

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        smoothed = self._smooth(risk, update=update) if self.ema is not None else risk
        return self.beta_min + (self.beta_max - self.beta_min) * smoothed

    def _smooth(self, risk: Tensor, *, update: bool) -> Tensor:
        """Apply the batched EMA described in the class docstring to ``risk [B]``."""
        lam = float(self.ema)  # type: ignore[arg-type]
        batch_mean = float(risk.mean())
        prev = batch_mean if self._state is None else self._state
        if update:
            self._state = lam * prev + (1.0 - lam) * batch_mean
        # Clamp guards float rounding; convex combinations of values in [0, 1] stay there.
        return (lam * prev + (1.0 - lam) * risk).clamp(0.0, 1.0)

    @property
    def min_beta(self) -> float:
        return self.beta_min

    def state_dict(self) -> dict[str, Any]:
        return {"ema_state": self._state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        value = state.get("ema_state")
        self._state = None if value is None else _check_unit("ema_state", value)

    def __repr__(self) -> str:
        return (
            f"LinearRiskSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, "
            f"ema={self.ema})"
        )


class JudgeScoreSchedule(RiskSchedule):
    """The authors' mapping of an LLM-judge harm score ``r`` in {1, ..., 5} to beta.

    ``beta = clamp((r - 2) / 3, low, high)`` where the risk is the judge score normalised as
    ``s = (r - 1) / 4``, i.e. ``r = 1 + 4 s``. Scores 1 and 2 give ``low``, 5 gives ``high``.

    Example:
        >>> JudgeScoreSchedule()(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
        tensor([0.1000, 0.1000, 0.3333, 0.6667, 0.9000])
    """

    def __init__(self, low: float = 0.1, high: float = 0.9):
        self.low = _check_unit("low", low)
        self.high = _check_unit("high", high)
        _check_order("low", self.low, "high", self.high)

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        score = 1.0 + 4.0 * risk
        return ((score - 2.0) / 3.0).clamp(self.low, self.high)

    @property
    def min_beta(self) -> float:
        return self.low

    def __repr__(self) -> str:
        return f"JudgeScoreSchedule(low={self.low}, high={self.high})"


class ThresholdRiskSchedule(RiskSchedule):
    """``beta = beta_high if s >= threshold else beta_low``: a hard risky / benign split.

    Example:
        >>> ThresholdRiskSchedule(0.5, 0.1, 0.9)(torch.tensor([0.2, 0.5]))
        tensor([0.1000, 0.9000])
    """

    def __init__(self, threshold: float = 0.5, beta_low: float = 0.1, beta_high: float = 0.9):
        self.threshold = _check_unit("threshold", threshold)
        self.beta_low = _check_unit("beta_low", beta_low)
        self.beta_high = _check_unit("beta_high", beta_high)
        _check_order("beta_low", self.beta_low, "beta_high", self.beta_high)

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        high = torch.full_like(risk, self.beta_high)
        return torch.where(risk >= self.threshold, high, torch.full_like(risk, self.beta_low))

    @property
    def min_beta(self) -> float:
        return self.beta_low

    def __repr__(self) -> str:
        return (
            f"ThresholdRiskSchedule(threshold={self.threshold}, beta_low={self.beta_low}, "
            f"beta_high={self.beta_high})"
        )


class ConstantBeta(RiskSchedule):
    """``beta = c`` for every example, whatever its risk.

    The paper's constant-KL baseline ("C-SFT"); ``beta = 0`` is plain SFT and never needs the
    reference model.

    Example:
        >>> ConstantBeta(0.5)(torch.tensor([0.0, 1.0]))
        tensor([0.5000, 0.5000])
    """

    uses_risk = False

    def __init__(self, beta: float = 0.5):
        self.beta = _check_unit("beta", beta)

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        return torch.full_like(risk, self.beta)

    @property
    def min_beta(self) -> float:
        return self.beta

    def __repr__(self) -> str:
        return f"ConstantBeta(beta={self.beta})"


def schedule_from_config(config: Mapping[str, Any]) -> RiskSchedule:
    """Rebuild a schedule from :meth:`RiskSchedule.config` (as stored in checkpoint hparams)."""
    module_name, _, class_name = str(config.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, RiskSchedule)):
        raise RiskError(f"unknown risk schedule {config.get('class_path')!r}: use a RiskSchedule subclass")
    return cls(**config.get("init_args", {}))
