"""The adaptive-KL loss: per-example NLL and KL toward a frozen reference, weighted by beta.

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

import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_safety.errors import (
    DataError,
    IncompatibleReferenceError,
    LightningSafetyError,
    RiskError,
)
from lightning_safety.reference_cache import CachedTokens, coarse_kl, policy_coarse_log_probs

__all__ = ["AdaptiveKLOutput", "adaptive_kl_loss", "ProjectedLogits"]

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
    a float32 ``[R, T, V]`` tensor: with ``chunk_size`` a side costs one ``[chunk, V]`` block.

    For the reference (``trainable=False``, the default) give it only frozen, gradient-free parts:
    the reference's hidden states computed under ``no_grad`` and a frozen output layer. For the
    policy (``trainable=True``) the hidden states keep their graph and the output layer may be
    trained: the loss then gathers the response tokens' hidden states and applies the output
    layer inside each checkpointed chunk (a fused, chunked linear + loss), so the policy's
    ``[N, V]`` logits are never stored either. Either way the output layer must not
    post-process (logit soft-capping, scaling): check with the model's own logits first.

    Args:
        hidden: ``[R, T, H]`` final hidden states (after the final norm).
        output_layer: maps ``[..., H]`` to ``[..., V]`` logits (the model's ``lm_head``).
        vocab_size: ``V``.
        trainable: keep gradients (the policy's side).
    """

    def __init__(
        self, hidden: Tensor, output_layer: Callable[[Tensor], Tensor], vocab_size: int, *, trainable: bool = False
    ) -> None:
        self.hidden = hidden if trainable else hidden.detach()
        self.output_layer = output_layer
        self.vocab_size = int(vocab_size)
        self.trainable = trainable

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
        if not self.trainable:
            return self
        return ProjectedLogits(self.hidden.detach(), self.output_layer, self.vocab_size)

    def __getitem__(self, index: Any) -> Tensor:
        if self.trainable:
            return self.output_layer(self.hidden[index])
        with torch.no_grad():
            return self.output_layer(self.hidden[index])

    def materialize(self) -> Tensor:
        """The full ``[R, T, V]`` logits (for tests and small inputs)."""
        return self[:, :]


def adaptive_kl_loss(
    policy_logits: Tensor | ProjectedLogits,
    reference_logits: Tensor | ProjectedLogits | CachedTokens | None,
    labels: Tensor,
    beta: Tensor | float,
    *,
    weighting: Weighting = "convex",
    direction: Direction = "forward",
    normalization: Normalization = "token",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reference_rows: Tensor | None = None,
    kl_scale: float = 1.0,
) -> AdaptiveKLOutput:
    """Mixture of NLL and KL toward a reference, weighted per example.

    Follows the Hugging Face causal-LM convention: ``labels`` has the input's length and the
    logits at position ``t`` predict ``labels[:, t + 1]``; a response token is a shifted label
    that is not ``ignore_index``. For each response token (in float32)::

        nll_bt = -log pi_theta(y_bt)
        kl_bt  = KL(pi_ref || pi_theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))   forward
        kl_bt  = KL(pi_theta || pi_ref) = sum_v p_theta(v) (log p_theta(v) - log p_ref(v)) reverse

        token:    loss = sum_{b, t} (alpha_b nll_bt + lambda beta_b kl_bt) / N
        example:  loss = sum_b (alpha_b mean_t nll_bt + lambda beta_b mean_t kl_bt) / B'

    with ``alpha_b = 1 - beta_b`` ("convex") or ``1`` ("additive"), ``lambda = kl_scale`` (1, the
    paper, unless set), ``N`` the number of response
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
        policy_logits: ``[B, T, V]`` logits of the policy, any float dtype, or
            :class:`ProjectedLogits` with ``trainable=True`` (hidden states + output layer,
            projected inside each chunk: no ``[N, V]`` policy logits are stored).
        reference_logits: ``[R, T, V]`` logits of the reference for the rows in
            ``reference_rows`` (all ``B`` rows when that is None), or None when every beta is 0;
            or :class:`ProjectedLogits` (hidden states + output layer), projected per chunk; or
            :class:`~lightning_safety.reference_cache.CachedTokens`, the reference's cached top-k
            output for the response tokens of those rows (row order, each row's tokens in
            position order): the KL is then :func:`~lightning_safety.reference_cache.topk_kl`,
            coarse-grained to the k cached tokens and the rest (a lower bound, exact at k = V).
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
            chunk may span rows), so that at most one chunk's float32 ``[chunk_size, V]``
            temporaries are alive in forward and backward. Either way NLL and KL have a
            hand-written backward that keeps only its inputs: what stays alive for backward is the
            gathered ``[N, V]`` policy logits in their own dtype (with a trainable
            :class:`ProjectedLogits` policy, not even that: each chunk is recomputed from the hidden
            states under activation checkpointing). Results equal the unchunked path up to float32
            rounding.
        reference_rows: ``[R]`` int64, the policy row of each ``reference_logits`` row. Rows not
            listed get no KL and must have ``beta == 0``.
        kl_scale: ``lambda``, a factor on every row's KL term that leaves ``alpha`` as it is: a risky
            row's NLL is still scaled down by ``1 - beta`` while its pull toward the reference is
            ``lambda beta``. 1 is the paper's loss; 0 is risk-weighted SFT (no KL: no reference is
            needed, ``reference_logits`` may be None). The KL pulls the shared weights toward the
            reference everywhere, not only on the held rows, which costs task accuracy (see the README).

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
    kl_scale = check_kl_scale(kl_scale)
    device = policy_logits.device
    beta_t = _as_beta(beta, batch, device)
    alpha_t = 1.0 - beta_t if weighting == "convex" else torch.ones_like(beta_t)
    if kl_scale == 0.0:  # no KL term: the reference is not read
        reference_logits, reference_rows = None, None
    kl_beta = beta_t * kl_scale if kl_scale != 1.0 else beta_t
    ref_index = _reference_index(reference_logits, reference_rows, kl_beta, seq_len, vocab)
    plan = _plan_tokens(labels, ref_index, ignore_index, vocab)
    if isinstance(reference_logits, CachedTokens) and len(reference_logits) != plan.num_ref_tokens:
        raise DataError(
            f"the cached reference holds {len(reference_logits)} tokens but the rows with a reference have "
            f"{plan.num_ref_tokens} response tokens: look up the same rows, in row order"
        )
    nll_tok, kl_tok = _token_losses_chunked(
        policy_logits, reference_logits, plan, direction, chunk_size
    )
    return _assemble(nll_tok, kl_tok, plan, alpha_t, beta_t, normalization, kl_weight=kl_beta)


def check_kl_scale(kl_scale: Any) -> float:
    """``kl_scale`` as a float in [0, inf), or a one-line error."""
    if isinstance(kl_scale, bool) or not isinstance(kl_scale, (int, float)) or not 0.0 <= float(kl_scale) < float("inf"):
        raise LightningSafetyError(
            f"kl_scale must be a finite number >= 0 (1: the paper's loss, 0: no KL); got {kl_scale!r}"
        )
    return float(kl_scale)


def _align_labels(policy_logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Labels of the last ``T'`` positions when the logits cover only those (``logits_to_keep``)."""
    if not isinstance(policy_logits, (Tensor, ProjectedLogits)) or not isinstance(labels, Tensor):
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
    if not isinstance(policy_logits, (Tensor, ProjectedLogits)) or policy_logits.dim() != 3:
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
    reference_logits: Tensor | ProjectedLogits | CachedTokens | None,
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
        if isinstance(reference_logits, CachedTokens):  # per token, not per position: no [R, T, V] to check
            rows = torch.arange(batch, device=device) if reference_rows is None else _check_rows(reference_rows, None, batch)
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
    return _check_rows(reference_rows, num_ref, batch)


def _check_rows(reference_rows: Tensor, num_ref: int | None, batch: int) -> Tensor:
    """Validate ``[R]`` policy row indices (``R = num_ref`` when known); return them as int64."""
    num_ref = reference_rows.shape[0] if num_ref is None and isinstance(reference_rows, Tensor) else num_ref
    if not isinstance(reference_rows, Tensor) or (
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
    reference_logits: Tensor | ProjectedLogits | CachedTokens | None,
    ref_rows: Tensor,
    ref_positions: Tensor,
    direction: Direction,
    project: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token NLL and KL for one chunk of ``n`` response tokens, in float32.

    Args:
        policy: ``[n, V]`` policy logits of the chunk's tokens, or ``[n, H]`` hidden states
            when ``project`` (the policy's output layer) is given.
        targets: ``[n]`` int64 label ids.
        reference_logits: ``[R, T, V]`` detached reference logits, or None.
        ref_rows, ref_positions: ``[m]`` int64 (``m <= n``): where the reference logits of the
            chunk's first ``m`` tokens are. The reference is indexed here rather than gathered
            up front, so no copy of it outlives the chunk (it needs no gradient).

    Returns:
        ``nll [n]`` and ``kl [m]``.
    """
    logits = policy if project is None else project(policy)
    m = ref_rows.shape[0]
    if not isinstance(reference_logits, CachedTokens):
        # One fused pass for NLL and KL with a hand-written backward (see _DenseTokenLoss).
        if reference_logits is None or m == 0:
            return _DenseTokenLoss.apply(logits, targets, None, direction)
        return _DenseTokenLoss.apply(logits, targets, functools.partial(_reference_chunk, reference_logits, ref_rows, ref_positions), direction)
    if m == 0:
        return _DenseTokenLoss.apply(logits, targets, None, direction)
    return _CachedTokenLoss.apply(logits, targets, reference_logits, direction)  # this chunk's m cached tokens


class _CachedTokenLoss(torch.autograd.Function):
    """Per-token NLL ``[n]`` and the top-k KL ``[m]`` against cached reference tokens, with a
    hand-written backward (the values are :func:`~lightning_safety.reference_cache.topk_kl`'s).

    The ``k + 1`` outcomes are the cached ids and the rest; ``P_i`` / ``Q_i`` are the policy's and the
    reference's mass on outcome ``i`` and ``i(j)`` the outcome of token ``j``. With ``p = softmax(x)``::

        forward KL(Q || P):  d / dx_j = p_j - Q_i(j) p_j / P_i(j)   (p_j - q_j on a cached id)
        reverse KL(P || Q):  d / dx_j = p_j (log P_i(j) - log Q_i(j) - KL)

    Keeps the inputs and a few ``[n]`` vectors; no chunk needs recomputing for backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, cached: CachedTokens, direction: str):
        x = logits.float()
        m = len(cached)
        lse = torch.logsumexp(x, dim=-1)  # [n]
        nll = lse - x.gather(-1, targets[:, None]).squeeze(-1)
        logp_ids, logp_tail = policy_coarse_log_probs(x[:m], cached, lse[:m])
        kl = coarse_kl(logp_ids, logp_tail, cached, direction)
        ctx.save_for_backward(logits, targets, lse, kl, logp_ids, logp_tail)  # [n, V] input + small tensors
        ctx.cached, ctx.direction = cached, direction
        return nll, kl

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor, grad_kl: Tensor):
        logits, targets, lse, kl, logp_ids, log_p_tail = ctx.saved_tensors
        cached: CachedTokens = ctx.cached
        x = logits.float()
        m = len(cached)
        ids = cached.token_ids.long()  # [m, k]
        grad = (x - lse[:, None]).exp_()  # p [n, V]; becomes the gradient in place
        p_ids = logp_ids.exp()  # [m, k]
        log_q, log_q_tail = cached.logprobs.float(), cached.tail.float()
        g_nll, g_kl = grad_nll[:m, None], grad_kl[:, None]
        if ctx.direction == "forward":
            # other tokens: p_j (1 - Q_t / P_t); cached ids: p_j - q_j
            other = 1.0 - torch.exp(log_q_tail - log_p_tail)[:, None]
            on_ids = g_nll * p_ids + g_kl * (p_ids - log_q.exp())
        else:
            # other tokens: p_j (log P_t - log Q_t - KL); cached ids: p_j (log p_j - log q_j - KL)
            other = (log_p_tail - log_q_tail - kl)[:, None]
            on_ids = p_ids * (g_nll + g_kl * (logp_ids - log_q - kl[:, None]))
        grad[:m].mul_(g_nll + g_kl * other)
        grad[m:].mul_(grad_nll[m:, None])
        grad[:m].scatter_(-1, ids, on_ids)
        grad.scatter_add_(-1, targets[:, None], -grad_nll[:, None])  # d nll = p - onehot
        return grad.to(logits.dtype), None, None, None


def _reference_chunk(reference_logits: Tensor | ProjectedLogits, rows: Tensor, positions: Tensor) -> Tensor:
    """The reference's float32 logits ``[m, V]`` at (rows, positions), without gradients."""
    with torch.no_grad():
        return reference_logits[rows, positions].float()


class _DenseTokenLoss(torch.autograd.Function):
    """Per-token NLL ``[n]`` and KL ``[m]`` (first ``m`` tokens) from policy logits ``[n, V]``, with a
    hand-written backward that needs no saved ``[n, V]`` intermediates.

    With ``p = softmax(x)`` and ``q = softmax(z)`` (the reference, recomputed by ``reference_fn``)::

        nll = lse(x) - x[y]                          d nll / dx = p - onehot(y)
        forward KL(q || p) = sum q (z - x) - lse(z) + lse(x)     d / dx = p - q
        reverse KL(p || q) = sum p (x - z) - lse(x) + lse(z)     d / dx = p * (log p - log q - KL)

    Autograd would keep (or, under checkpointing, recompute) about a dozen float32 ``[n, V]``
    tensors; this keeps the inputs and a few ``[n]`` vectors, and its backward makes ``p`` and
    ``q`` once each. Results equal the autograd formulas up to float32 rounding (tests).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, reference_fn: Callable[[], Tensor] | None, direction: str):
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)  # [n]
        nll = lse - x.gather(-1, targets[:, None]).squeeze(-1)
        kl = x.new_zeros(0)
        lse_z = None
        if reference_fn is not None:
            logq = reference_fn()  # [m, V] float32, a fresh tensor: changed in place below
            m = logq.shape[0]
            lse_z = torch.logsumexp(logq, dim=-1)  # [m]
            logq.sub_(lse_z[:, None])
            # Differences elementwise, then one row dot: summing q log q and q x apart would cancel
            # in float32 (errors ~1e-6 where the KL is ~0, e.g. at the first step).
            if direction == "forward":  # sum q (log q - log p)
                q = logq.exp()
                kl = _rowdot(q, logq.sub_(x[:m]).add_(lse[:m, None]))
            else:  # sum p (log p - log q)
                p = (x[:m] - lse[:m, None]).exp_()
                kl = _rowdot(p, logq.neg_().add_(x[:m]).sub_(lse[:m, None]))
            kl = kl.clamp_min(0.0)  # a KL is >= 0; rounding can give -1e-7
        ctx.save_for_backward(logits, targets, lse, kl, lse_z if lse_z is not None else lse.new_zeros(0))
        ctx.reference_fn, ctx.direction = reference_fn, direction
        return nll, kl

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor, grad_kl: Tensor):
        logits, targets, lse, kl, lse_z = ctx.saved_tensors
        x = logits.float()
        grad = (x - lse[:, None]).exp_()  # p [n, V]; becomes the gradient in place
        if ctx.reference_fn is not None and kl.numel():
            m = kl.shape[0]
            part = ctx.reference_fn().sub_(lse_z[:, None])  # log q [m, V]
            if ctx.direction == "forward":  # p - q
                part.exp_().neg_().add_(grad[:m])
            else:  # p (log p - log q - KL)
                part.neg_().add_(x[:m]).sub_((lse[:m] + kl)[:, None]).mul_(grad[:m])
            grad.mul_(grad_nll[:, None])
            grad[:m].add_(part.mul_(grad_kl[:, None]))
        else:
            grad.mul_(grad_nll[:, None])
        grad.scatter_add_(-1, targets[:, None], -grad_nll[:, None])  # d nll = p - onehot
        return grad.to(logits.dtype), None, None, None


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``[m, V]`` inputs without an ``[m, V]`` temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(-1)


def _token_losses_chunked(
    policy_logits: Tensor,
    reference_logits: Tensor | ProjectedLogits | CachedTokens | None,
    plan: _TokenPlan,
    direction: Direction,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Gather the response tokens and compute ``nll [N]`` and ``kl [M]``, chunk by chunk.

    The policy's response tokens are gathered once, ``[N, V]`` in the logits' dtype: gathering
    inside each chunk instead would make every chunk's backward zero-fill a full ``[B, T, V]``
    gradient. Everything float32 and ``V``-wide is then made one chunk at a time.
    """
    project = None
    if isinstance(policy_logits, ProjectedLogits):
        # Fused: gather [N, H] hidden states; the output layer runs inside each chunk.
        policy, project = policy_logits.hidden[plan.rows, plan.positions], policy_logits.output_layer
    else:
        policy = policy_logits[plan.rows, plan.positions]  # [N, V], logits dtype
    reference = reference_logits
    if isinstance(reference, (Tensor, ProjectedLogits)):
        reference = reference.detach()  # frozen
    ref_positions = plan.positions[: plan.num_ref_tokens]
    fn = functools.partial(_token_losses, direction=direction, project=project)
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
    # A cached reference is per token: chunk i gets chunk i of its [M] tokens.
    cached_chunks = reference.split(chunk_size) if isinstance(reference, CachedTokens) else None
    # The token-loss Functions keep only their inputs for backward, so a chunk needs recomputing only
    # when its logits are made inside it (the fused output layer: else [chunk, V] would be kept per chunk).
    needs_grad = torch.is_grad_enabled() and (policy.requires_grad or getattr(policy_logits, "trainable", False))
    recompute = needs_grad and project is not None
    nll_parts, kl_parts = [], []
    for i, (p_chunk, t_chunk) in enumerate(zip(policy_chunks, target_chunks)):
        has_ref = i < len(ref_row_chunks)
        args = (
            p_chunk,
            t_chunk,
            cached_chunks[i] if cached_chunks is not None and has_ref else reference,
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
    kl_weight: Tensor | None = None,
) -> AdaptiveKLOutput:
    """Weight and reduce the per-token ``nll [N]`` and ``kl [M]`` into an output.

    ``kl_weight [B]`` weighs the KL (default ``beta``; ``kl_scale * beta`` when scaled)."""
    num_tokens = plan.num_tokens
    num_ref = plan.num_ref_tokens
    ref_token_rows = plan.rows[:num_ref]
    denom = plan.tokens_per_example.clamp_min(1).to(torch.float32)  # [B]
    nll_weight, kl_weight = alpha, beta if kl_weight is None else kl_weight
    if normalization == "example":
        # Each token carries 1 / (its row's token count): a row's tokens sum to its token mean.
        nll_weight, kl_weight = alpha / denom, kl_weight / denom
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


# Re-exported for class paths in earlier configs and checkpoints (lightning_safety.losses.X).
from lightning_safety.schedules import ConstantBeta, JudgeScoreSchedule, LinearRiskSchedule  # noqa: E402, F401
from lightning_safety.schedules import RiskSchedule, ThresholdRiskSchedule, schedule_from_config, validate_risk  # noqa: E402, F401
