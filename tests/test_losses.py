"""Tests for the adaptive-KL loss and the risk schedules.

The loss is checked against a float64 brute force written with explicit loops over (b, t),
independent of the implementation's gather / chunk / checkpoint machinery.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lightning_safety.errors import DataError, IncompatibleReferenceError, LightningSafetyError, RiskError
from lightning_safety.losses import (
    AdaptiveKLOutput,
    ConstantBeta,
    JudgeScoreSchedule,
    LinearRiskSchedule,
    RiskSchedule,
    ThresholdRiskSchedule,
    adaptive_kl_loss,
    validate_risk,
)

B, T, V = 3, 7, 11
ATOL = 1e-5


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def make_batch(seed: int, batch: int = B, seq: int = T, vocab: int = V):
    """Random logits and labels; row lengths differ (row 0 has a single response token)."""
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(batch, seq, vocab, generator=gen) * 2
    reference = torch.randn(batch, seq, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    keep = torch.rand(batch, seq, generator=gen) < 0.6
    keep[:, 0] = False  # the first label is never predicted
    keep[0] = False
    keep[0, seq - 1] = True  # a row with exactly one response token
    keep[1, 1] = True  # every row has at least one token
    labels = torch.where(keep, labels, torch.full_like(labels, -100))
    beta = torch.rand(batch, generator=gen)
    return policy, reference, labels, beta


def brute_force(policy, reference, labels, beta, weighting, direction, ref_rows=None, ignore=-100, kl_scale=1.0):
    """Float64 loops: returns the loss (differentiable in ``policy``) and per-row statistics."""
    batch, seq, _ = policy.shape
    rows = range(batch) if ref_rows is None else [int(b) for b in ref_rows]
    ref_of = {b: i for i, b in enumerate(rows)}  # policy row -> reference row
    total = policy.new_zeros(())
    nll_rows, kl_rows, counts = [], [], []
    all_nll, all_kl = [], []
    for b in range(batch):
        beta_b = float(beta[b])
        alpha_b = 1.0 - beta_b if weighting == "convex" else 1.0
        nll_b, kl_b = [], []
        for t in range(seq - 1):
            y = int(labels[b, t + 1])
            if y == ignore:
                continue
            logp = torch.log_softmax(policy[b, t], dim=-1)
            nll = -logp[y]
            kl = policy.new_zeros(())
            if b in ref_of:
                logq = torch.log_softmax(reference[ref_of[b], t].double(), dim=-1)
                if direction == "forward":
                    kl = sum(logq[v].exp() * (logq[v] - logp[v]) for v in range(logp.shape[0]))
                else:
                    kl = sum(logp[v].exp() * (logp[v] - logq[v]) for v in range(logp.shape[0]))
                kl_b.append(kl)
            total = total + alpha_b * nll + kl_scale * beta_b * kl
            nll_b.append(nll)
        counts.append(len(nll_b))
        nll_rows.append(sum(nll_b) / len(nll_b) if nll_b else torch.tensor(0.0))
        kl_rows.append(sum(kl_b) / len(kl_b) if kl_b else torch.tensor(0.0))
        all_nll += nll_b
        all_kl += kl_b
    n = sum(counts)
    return {
        "loss": total / n,
        "nll": sum(all_nll) / n,
        "kl": sum(all_kl) / len(all_kl) if all_kl else torch.tensor(0.0),
        "nll_per_example": torch.stack([x.detach() for x in nll_rows]),
        "kl_per_example": torch.stack([x.detach() for x in kl_rows]),
        "tokens_per_example": torch.tensor(counts),
        "num_tokens": n,
    }


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual.double(), expected.double().detach(), atol=atol, rtol=1e-5)


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs.

    Views count once (chunks of one gathered tensor share its storage); the storages of
    ``exclude`` (inputs the caller keeps alive anyway) do not count.
    """
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for t in exclude:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


# ------------------------------------------------------------------------------------------
# Loss against the brute force
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "weighting,direction", list(itertools.product(["convex", "additive"], ["forward", "reverse"]))
)
def test_matches_brute_force_values_and_gradients(seed, weighting, direction):
    policy, reference, labels, beta = make_batch(seed)
    policy32 = policy.clone().requires_grad_()
    out = adaptive_kl_loss(
        policy32, reference, labels, beta, weighting=weighting, direction=direction
    )
    out.loss.backward()

    policy64 = policy.double().requires_grad_()
    ref = brute_force(policy64, reference, labels, beta, weighting, direction)
    ref["loss"].backward()

    assert isinstance(out, AdaptiveKLOutput)
    close(out.loss, ref["loss"])
    close(out.nll, ref["nll"])
    close(out.kl, ref["kl"])
    close(out.nll_per_example, ref["nll_per_example"])
    close(out.kl_per_example, ref["kl_per_example"])
    assert torch.equal(out.tokens_per_example, ref["tokens_per_example"])
    assert out.num_tokens.dtype == torch.int64 and int(out.num_tokens) == ref["num_tokens"]
    close(out.loss_sum / out.num_tokens, out.loss, atol=1e-6)
    close(out.beta, beta)
    close(out.alpha, 1 - beta if weighting == "convex" else torch.ones(B))
    close(policy32.grad, policy64.grad)
    assert not out.nll.requires_grad and not out.kl_per_example.requires_grad


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_equals_unchunked(chunk_size, direction):
    policy, reference, labels, beta = make_batch(3)
    grads, outs = [], []
    for chunk in (None, chunk_size):
        logits = policy.clone().requires_grad_()
        out = adaptive_kl_loss(
            logits, reference, labels, beta, direction=direction, chunk_size=chunk
        )
        out.loss.backward()
        grads.append(logits.grad)
        outs.append(out)
    for name in ("loss", "nll", "kl", "nll_per_example", "kl_per_example", "loss_sum"):
        close(getattr(outs[1], name), getattr(outs[0], name), atol=1e-6)
    close(grads[1], grads[0], atol=1e-6)
    assert outs[1].loss.requires_grad


def test_chunked_with_reference_subset_and_no_grad():
    policy, reference, labels, _ = make_batch(4)
    beta = torch.tensor([0.4, 0.0, 0.8])
    rows = torch.tensor([2, 0])
    full = adaptive_kl_loss(policy, reference[rows], labels, beta, reference_rows=rows)
    with torch.no_grad():
        chunked = adaptive_kl_loss(
            policy, reference[rows], labels, beta, reference_rows=rows, chunk_size=2
        )
    close(chunked.loss, full.loss, atol=1e-6)
    close(chunked.kl_per_example, full.kl_per_example, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("weighting", ["convex", "additive"])
def test_example_normalization_is_the_mean_of_one_row_losses(weighting, chunk_size):
    """The authors' micro-batches of one example: every row weighs the same, whatever its length."""
    policy, reference, labels, beta = make_batch(6, batch=4)
    labels[3] = -100  # a row without response tokens counts for nothing
    rows = torch.tensor([0, 1, 2])  # row 3 gets no reference: it needs none with beta 0
    beta[3] = 0.0
    grad_policy = policy.clone().requires_grad_()
    out = adaptive_kl_loss(
        grad_policy, reference[rows], labels, beta, weighting=weighting,
        normalization="example", chunk_size=chunk_size, reference_rows=rows,
    )
    out.loss.backward()

    one_row_policy = policy.clone().requires_grad_()
    one_row_losses = [
        adaptive_kl_loss(
            one_row_policy[b : b + 1], reference[b : b + 1], labels[b : b + 1], beta[b : b + 1], weighting=weighting
        ).loss
        for b in range(3)
    ]
    expected = torch.stack(one_row_losses).mean()
    expected.backward()
    close(out.loss, expected)
    close(policy.new_tensor(float(out.denominator)), torch.tensor(3.0))
    close(out.loss_sum / out.denominator, out.loss, atol=1e-6)
    close(grad_policy.grad, one_row_policy.grad)
    # Rows differ in length here, so the token mean weighs them differently.
    token = adaptive_kl_loss(policy, reference[rows], labels, beta, weighting=weighting, reference_rows=rows)
    assert abs(float(token.loss) - float(out.loss.detach())) > 1e-3
    assert int(token.denominator) == int(token.num_tokens)


def test_example_and_token_normalization_agree_when_rows_have_equal_lengths():
    policy, reference, labels, beta = make_batch(7)
    labels[:] = -100
    labels[:, 3:6] = 1  # three response tokens in every row
    token = adaptive_kl_loss(policy, reference, labels, beta)
    example = adaptive_kl_loss(policy, reference, labels, beta, normalization="example")
    close(example.loss, token.loss, atol=1e-6)


def test_reference_rows_subset_matches_full_when_skipped_rows_have_zero_beta():
    policy, reference, labels, _ = make_batch(5)
    beta = torch.tensor([0.3, 0.0, 0.7])
    rows = torch.tensor([2, 0])  # any order
    full = adaptive_kl_loss(policy, reference, labels, beta)
    subset = adaptive_kl_loss(policy, reference[rows], labels, beta, reference_rows=rows)
    close(subset.loss, full.loss, atol=1e-6)
    close(subset.nll_per_example, full.nll_per_example, atol=1e-6)
    close(subset.kl_per_example[[0, 2]], full.kl_per_example[[0, 2]], atol=1e-6)
    assert float(subset.kl_per_example[1]) == 0.0
    ref = brute_force(
        policy.double(), reference[rows], labels, beta, "convex", "forward", ref_rows=rows
    )
    close(subset.kl, ref["kl"])


def test_row_with_beta_but_no_reference_row_raises():
    policy, reference, labels, _ = make_batch(5)
    beta = torch.tensor([0.3, 0.2, 0.7])
    with pytest.raises(RiskError, match="beta > 0 but no reference logits"):
        rows = torch.tensor([0, 2])
        adaptive_kl_loss(policy, reference[rows], labels, beta, reference_rows=rows)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_scale_weighs_the_kl_term_only(direction, chunk_size):
    policy, reference, labels, beta = make_batch(8)
    policy32 = policy.clone().requires_grad_()
    out = adaptive_kl_loss(policy32, reference, labels, beta, direction=direction, chunk_size=chunk_size, kl_scale=0.3)
    out.loss.backward()
    policy64 = policy.double().requires_grad_()
    ref = brute_force(policy64, reference, labels, beta, "convex", direction, kl_scale=0.3)
    ref["loss"].backward()
    close(out.loss, ref["loss"])
    close(policy32.grad, policy64.grad)
    close(out.alpha, 1 - beta)  # the NLL keeps its 1 - beta
    close(out.beta, beta)
    close(out.kl, ref["kl"])  # the reported KL is the KL itself, not its weighted share
    paper = adaptive_kl_loss(policy, reference, labels, beta, direction=direction)
    assert abs(float(paper.loss) - float(out.loss.detach())) > 1e-3


def test_kl_scale_zero_is_risk_weighted_cross_entropy_and_reads_no_reference():
    policy, reference, labels, beta = make_batch(9)
    without = adaptive_kl_loss(policy, None, labels, beta, kl_scale=0.0)
    ignored = adaptive_kl_loss(policy, reference, labels, beta, kl_scale=0.0)
    ref = brute_force(policy.double(), reference, labels, beta, "convex", "forward", kl_scale=0.0)
    close(without.loss, ref["loss"])
    close(ignored.loss, without.loss, atol=1e-7)
    assert float(without.kl) == 0.0
    with pytest.raises(RiskError, match="beta > 0 but no reference logits"):
        adaptive_kl_loss(policy, None, labels, beta, kl_scale=0.1)


@pytest.mark.parametrize("kl_scale", [-0.5, float("nan"), float("inf"), True, "1"])
def test_bad_kl_scale_is_refused_in_one_line(kl_scale):
    policy, reference, labels, beta = make_batch(0)
    with pytest.raises(LightningSafetyError, match="kl_scale must be a finite number >= 0") as error:
        adaptive_kl_loss(policy, reference, labels, beta, kl_scale=kl_scale)
    assert "\n" not in str(error.value)


def test_zero_beta_is_plain_cross_entropy_without_reference():
    policy, _, labels, _ = make_batch(6)
    logits = policy.clone().requires_grad_()
    out = adaptive_kl_loss(logits, None, labels, 0.0)
    expected = F.cross_entropy(policy[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
    assert float(out.kl) == 0.0 and torch.all(out.kl_per_example == 0)
    out.loss.backward()
    assert logits.grad is not None
    out_chunked = adaptive_kl_loss(
        policy, None, labels, torch.zeros(B), chunk_size=2, weighting="additive"
    )
    torch.testing.assert_close(out_chunked.loss, expected, atol=1e-6, rtol=0)


def test_kl_zero_for_identical_reference_and_positive_otherwise():
    policy, reference, labels, beta = make_batch(7)
    for direction in ("forward", "reverse"):
        same = adaptive_kl_loss(policy, policy.clone(), labels, beta, direction=direction)
        assert abs(float(same.kl)) < 1e-6
        assert same.kl_per_example.abs().max() < 1e-6
        other = adaptive_kl_loss(policy, reference, labels, beta, direction=direction)
        assert float(other.kl) > 0.01
        assert torch.all(other.kl_per_example > 0)


def test_reference_gets_no_gradient_and_bf16_logits_work():
    policy, reference, labels, beta = make_batch(8)
    ref = reference.clone().requires_grad_()
    low = policy.to(torch.bfloat16).requires_grad_()
    out = adaptive_kl_loss(low, ref, labels, beta, chunk_size=3)
    out.loss.backward()
    assert ref.grad is None
    assert low.grad.dtype == torch.bfloat16
    expected = adaptive_kl_loss(low.detach().float(), reference, labels, beta)
    close(out.loss, expected.loss, atol=1e-5)


def test_custom_ignore_index_and_scalar_beta():
    policy, reference, labels, _ = make_batch(9)
    relabelled = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    a = adaptive_kl_loss(policy, reference, labels, 0.25)
    b = adaptive_kl_loss(policy, reference, relabelled, torch.tensor(0.25), ignore_index=-1)
    close(b.loss, a.loss, atol=1e-7)
    close(a.beta, torch.full((B,), 0.25))


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "beta,match",
    [
        (torch.tensor([0.1, float("nan"), 0.2]), "finite"),
        (torch.tensor([0.1, 1.5, 0.2]), "in \\[0, 1\\]"),
        (torch.tensor([0.1, 0.2]), "shape"),
        (float("inf"), "finite"),
        (-0.1, "in \\[0, 1\\]"),
    ],
)
def test_bad_beta_raises_risk_error(beta, match):
    policy, reference, labels, _ = make_batch(0)
    with pytest.raises(RiskError, match=match) as info:
        adaptive_kl_loss(policy, reference, labels, beta)
    assert "\n" not in str(info.value)


def test_no_response_tokens_raises_data_error():
    policy, reference, labels, beta = make_batch(0)
    labels = labels.clone()
    labels[:, 1:] = -100
    labels[:, 0] = 3  # the first label is never a target
    with pytest.raises(DataError, match="no response tokens"):
        adaptive_kl_loss(policy, reference, labels, beta)
    assert issubclass(DataError, ValueError)


def test_beta_without_reference_raises():
    policy, _, labels, beta = make_batch(0)
    with pytest.raises(RiskError, match="reference"):
        adaptive_kl_loss(policy, None, labels, beta)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"labels": torch.zeros(B, T - 1, dtype=torch.long)}, DataError, "labels shape"),
        ({"labels": torch.zeros(B, T)}, DataError, "integer"),
        ({"policy_logits": torch.zeros(B, T)}, DataError, r"\[B, T, V\]"),
        ({"reference_logits": torch.zeros(B, T, V + 1)}, IncompatibleReferenceError, "vocabulary"),
        ({"reference_logits": torch.zeros(B - 1, T, V)}, DataError, "reference_rows"),
        ({"reference_rows": torch.tensor([0, 0, 1])}, DataError, "repeat"),
        ({"reference_rows": torch.tensor([0, 1, 5])}, DataError, "row indices"),
        ({"labels": torch.full((B, T), V, dtype=torch.long)}, DataError, "vocabulary"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"direction": "sideways"}, ValueError, "direction"),
        ({"normalization": "sequence"}, ValueError, "normalization must be 'token' or 'example'"),
    ],
)
def test_bad_shapes_and_options_raise(kwargs, error, match):
    policy, reference, labels, beta = make_batch(0)
    args = {"policy_logits": policy, "reference_logits": reference, "labels": labels, "beta": beta}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        adaptive_kl_loss(
            args.pop("policy_logits"),
            args.pop("reference_logits"),
            args.pop("labels"),
            args.pop("beta"),
            **args,
        )


# ------------------------------------------------------------------------------------------
# Memory of the chunked path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_saves_far_less_for_backward(direction):
    batch, seq, vocab, chunk = 2, 64, 4096, 8
    gen = torch.Generator().manual_seed(0)
    # bf16 logits as in real training: the only [N, V] tensor the chunked path keeps is the
    # gathered copy in that dtype, while the unchunked one keeps float32 [N, V] intermediates.
    policy = torch.randn(batch, seq, vocab, generator=gen).to(torch.bfloat16)
    reference = torch.randn(batch, seq, vocab, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :8] = -100  # a short prompt
    beta = torch.tensor([0.5, 0.2])
    n_tokens = batch * (seq - 1 - 7)

    def run(chunk_size):
        logits = policy.clone().requires_grad_()
        holder = {}

        def forward():
            holder["out"] = adaptive_kl_loss(
                logits, reference, labels, beta, direction=direction, chunk_size=chunk_size
            )

        nbytes = saved_bytes(forward, exclude=(logits, reference))
        holder["out"].loss.backward()
        return nbytes, logits.grad

    unchunked, grad_full = run(None)
    chunked, grad_chunked = run(chunk)
    float32_rows = n_tokens * vocab * 4  # one float32 [N, V] tensor
    # Neither path keeps a float32 [N, V] tensor for backward (autograd would keep several): the
    # gathered bf16 [N, V] policy logits and a few [N] vectors are all.
    bf16_rows = n_tokens * vocab * 2
    assert unchunked < float32_rows and chunked < float32_rows
    assert chunked < bf16_rows + 3 * chunk * vocab * 4  # bf16 [N, V] copy + < 1 chunk
    torch.testing.assert_close(grad_chunked, grad_full, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


def test_linear_schedule_formula_dtype_and_min_beta():
    schedule = LinearRiskSchedule(0.2, 0.6)
    beta = schedule(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert beta.dtype == torch.float32
    torch.testing.assert_close(beta, torch.tensor([0.2, 0.4, 0.6]))
    assert schedule.min_beta == 0.2
    assert isinstance(schedule, RiskSchedule)


def test_linear_schedule_validation():
    with pytest.raises(RiskError, match="beta_min") as info:
        LinearRiskSchedule(beta_min=0.9, beta_max=0.1)
    assert "beta_min (0.9) must not exceed beta_max (0.1)" in str(info.value)
    with pytest.raises(RiskError, match="beta_max"):
        LinearRiskSchedule(beta_max=1.2)
    with pytest.raises(RiskError, match="ema"):
        LinearRiskSchedule(ema=1.0)
    with pytest.raises(RiskError, match="ema"):
        LinearRiskSchedule(ema=float("nan"))


@pytest.mark.parametrize(
    "risk,match",
    [
        (torch.tensor([0.1, float("nan"), float("nan"), 1.5]), "got 2 NaN and 1 out-of-range"),
        (torch.tensor([float("inf")]), "got 0 NaN and 1 out-of-range"),
        (torch.tensor([-0.1]), "out-of-range"),
        (torch.tensor([[0.1]]), "1-D"),
        (torch.tensor([1, 0]), "float"),
        ([0.1], "tensor"),
    ],
)
def test_bad_risk_raises(risk, match):
    schedules = [LinearRiskSchedule(), JudgeScoreSchedule(), ThresholdRiskSchedule()]
    schedules.append(ConstantBeta())
    for schedule in schedules:
        with pytest.raises(RiskError, match=match):
            schedule(risk)
    with pytest.raises(RiskError, match=match):
        validate_risk(risk)


def test_ema_batch_size_one_follows_paper_recurrence():
    lam = 0.7
    signal = [0.9, 0.1, 0.5, 1.0, 0.0]
    schedule = LinearRiskSchedule(0.1, 0.9, ema=lam)
    smoothed = None
    for s in signal:
        smoothed = s if smoothed is None else lam * smoothed + (1 - lam) * s
        beta = schedule(torch.tensor([s]))
        torch.testing.assert_close(beta, torch.tensor([0.1 + 0.8 * smoothed]))
        assert schedule.state_dict()["ema_state"] == pytest.approx(smoothed)


def test_ema_batch_rows_differ_and_update_false_keeps_state():
    schedule = LinearRiskSchedule(0.0, 1.0, ema=0.5)
    assert schedule.state_dict() == {"ema_state": None}
    first = schedule(torch.tensor([0.0, 1.0]))  # state starts at the batch mean 0.5
    torch.testing.assert_close(first, torch.tensor([0.25, 0.75]))
    assert schedule.state_dict()["ema_state"] == pytest.approx(0.5)
    before = schedule.state_dict()
    peek = schedule(torch.tensor([1.0, 1.0]), update=False)
    torch.testing.assert_close(peek, torch.tensor([0.75, 0.75]))
    assert schedule.state_dict() == before
    fresh = LinearRiskSchedule(0.0, 1.0, ema=0.5)
    fresh(torch.tensor([0.3]), update=False)
    assert fresh.state_dict() == {"ema_state": None}


def test_ema_state_round_trip_continues_identically():
    original = LinearRiskSchedule(0.1, 0.9, ema=0.8)
    for s in (0.2, 0.9, 0.4):
        original(torch.tensor([s, 1 - s]))
    resumed = LinearRiskSchedule(0.1, 0.9, ema=0.8)
    resumed.load_state_dict(original.state_dict())
    for s in (0.7, 0.0, 0.3):
        risk = torch.tensor([s, 0.5])
        assert torch.equal(resumed(risk), original(risk))
    assert resumed.state_dict() == original.state_dict()
    with pytest.raises(RiskError, match="unknown keys"):
        resumed.load_state_dict({"other": 1.0})
    with pytest.raises(RiskError, match="ema_state"):
        resumed.load_state_dict({"ema_state": float("nan")})
    ConstantBeta().load_state_dict({})


def test_judge_score_schedule_on_normalised_scores():
    scores = torch.arange(1, 6, dtype=torch.float32)
    beta = JudgeScoreSchedule()((scores - 1) / 4)
    torch.testing.assert_close(beta, torch.tensor([0.1, 0.1, 1 / 3, 2 / 3, 0.9]))
    assert JudgeScoreSchedule(low=0.0, high=1.0).min_beta == 0.0
    with pytest.raises(RiskError, match="low"):
        JudgeScoreSchedule(low=0.8, high=0.2)


def test_threshold_schedule():
    schedule = ThresholdRiskSchedule(threshold=0.5, beta_low=0.1, beta_high=0.9)
    beta = schedule(torch.tensor([0.0, 0.49, 0.5, 1.0]))
    torch.testing.assert_close(beta, torch.tensor([0.1, 0.1, 0.9, 0.9]))
    assert schedule.min_beta == 0.1
    with pytest.raises(RiskError, match="threshold"):
        ThresholdRiskSchedule(threshold=1.5)
    with pytest.raises(RiskError, match="beta_low"):
        ThresholdRiskSchedule(beta_low=0.9, beta_high=0.1)


def test_constant_beta():
    schedule = ConstantBeta(0.3)
    torch.testing.assert_close(schedule(torch.tensor([0.0, 1.0, 0.5])), torch.full((3,), 0.3))
    assert schedule.min_beta == 0.3
    assert ConstantBeta(0.0).min_beta == 0.0
    with pytest.raises(RiskError, match="beta"):
        ConstantBeta(-0.5)
    with pytest.raises(RiskError, match="beta"):
        ConstantBeta(True)


def test_schedule_output_feeds_the_loss():
    policy, reference, labels, _ = make_batch(10)
    beta = JudgeScoreSchedule()(torch.tensor([0.0, 0.5, 1.0]))
    out = adaptive_kl_loss(policy, reference, labels, beta)
    assert torch.isfinite(out.loss)


def test_logits_of_the_last_positions_only_give_the_same_loss_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 13, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 9, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 9))
    labels[:, :4] = -100  # prompt: the first response label is at position 4, predicted by position 3
    beta = torch.tensor([0.2, 0.5, 0.9])
    full = adaptive_kl_loss(logits, ref, labels, beta)
    (grad_full,) = torch.autograd.grad(full.loss, logits)
    kept = adaptive_kl_loss(logits[:, 3:], ref[:, 3:], labels, beta)
    (grad_kept,) = torch.autograd.grad(kept.loss, logits)
    torch.testing.assert_close(kept.loss, full.loss)
    torch.testing.assert_close(grad_kept, grad_full)
    with pytest.raises(DataError, match="start earlier"):
        adaptive_kl_loss(logits[:, 4:], ref[:, 4:], labels, beta)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_projected_reference_logits_equal_materialised_ones(chunk_size):
    from lightning_safety.losses import ProjectedLogits

    torch.manual_seed(1)
    head = torch.nn.Linear(6, 13, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 9, 6)
    projected = ProjectedLogits(hidden, head, vocab_size=13)
    assert projected.shape == (2, 9, 13)
    logits = torch.randn(3, 9, 13, requires_grad=True)
    labels = torch.randint(0, 13, (3, 9))
    labels[:, :3] = -100
    beta = torch.tensor([0.5, 0.0, 0.9])
    rows = torch.tensor([0, 2])
    lazy = adaptive_kl_loss(logits, projected, labels, beta, reference_rows=rows, chunk_size=chunk_size)
    (grad_lazy,) = torch.autograd.grad(lazy.loss, logits)
    full = adaptive_kl_loss(logits, projected.materialize(), labels, beta, reference_rows=rows, chunk_size=chunk_size)
    (grad_full,) = torch.autograd.grad(full.loss, logits)
    torch.testing.assert_close(lazy.loss, full.loss)
    torch.testing.assert_close(lazy.kl_per_example, full.kl_per_example)
    torch.testing.assert_close(grad_lazy, grad_full)
    assert lazy.kl > 0


@pytest.mark.parametrize("chunk_size", [None, 3, 64])
@pytest.mark.parametrize("direction,normalization", [("forward", "token"), ("reverse", "example")])
def test_fused_policy_output_layer_gives_the_loss_and_gradients_of_full_logits(chunk_size, direction, normalization):
    """Policy as hidden states + a trainable output layer, projected per chunk inside the loss."""
    from lightning_safety.losses import ProjectedLogits

    torch.manual_seed(2)
    head = torch.nn.Linear(6, 13, bias=False)
    hidden = torch.randn(3, 9, 6, requires_grad=True)
    ref = torch.randn(2, 8, 13)  # the last 8 positions only, as with logits_to_keep
    labels = torch.randint(0, 13, (3, 9))
    labels[:, :3] = -100
    labels[1, 7:] = -100  # padding
    beta = torch.tensor([0.5, 0.0, 0.9])
    kwargs = {"reference_rows": torch.tensor([0, 2]), "chunk_size": chunk_size, "direction": direction, "normalization": normalization}

    fused = adaptive_kl_loss(ProjectedLogits(hidden[:, 1:], head, 13, trainable=True), ref, labels, beta, **kwargs)
    grads_fused = torch.autograd.grad(fused.loss, [hidden, head.weight])
    full = adaptive_kl_loss(head(hidden[:, 1:]), ref, labels, beta, **kwargs)
    grads_full = torch.autograd.grad(full.loss, [hidden, head.weight])

    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.kl_per_example, full.kl_per_example, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.nll_per_example, full.nll_per_example, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_fused, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(fused.kl) > 0 and grads_fused[1].abs().sum() > 0


def test_a_trainable_projection_is_not_detached_and_a_frozen_one_is():
    from lightning_safety.losses import ProjectedLogits

    head = torch.nn.Linear(4, 5, bias=False)
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    assert ProjectedLogits(hidden, head, 5, trainable=True)[:, :].requires_grad
    assert not ProjectedLogits(hidden, head, 5)[:, :].requires_grad
    assert not ProjectedLogits(hidden, head, 5, trainable=True).detach()[:, :].requires_grad


def cached_reference(ref_logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, top_k: int):
    """The reference's top-k output at the response tokens of ``rows``, as a cache stores it."""
    from lightning_safety.reference_cache import CachedTokens

    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    picked = [logq[r, (labels[r, 1:] != -100).nonzero().flatten()] for r in rows.tolist()]
    logq = torch.cat(picked)  # [M, V]
    values, ids = logq.topk(top_k, dim=-1)
    rest = logq.scatter(-1, ids, float("-inf"))
    return CachedTokens(ids, values, torch.logsumexp(rest, dim=-1).clamp_min(-87.3))


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_a_full_vocabulary_cache_gives_the_exact_loss_and_gradients(chunk_size, direction):
    torch.manual_seed(3)
    V = 11
    logits = torch.randn(3, 8, V, requires_grad=True)
    ref = torch.randn(3, 8, V)
    labels = torch.randint(0, V, (3, 8))
    labels[:, :3] = -100
    labels[2, 6:] = -100
    beta = torch.tensor([0.7, 0.0, 0.4])
    rows = torch.tensor([0, 2])
    kwargs = {"reference_rows": rows, "chunk_size": chunk_size, "direction": direction}
    cached = adaptive_kl_loss(logits, cached_reference(ref, labels, rows, top_k=V), labels, beta, **kwargs)
    (grad_cached,) = torch.autograd.grad(cached.loss, logits)
    exact = adaptive_kl_loss(logits, ref[rows], labels, beta, **kwargs)
    (grad_exact,) = torch.autograd.grad(exact.loss, logits)
    torch.testing.assert_close(cached.loss, exact.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.kl_per_example, exact.kl_per_example, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_cached, grad_exact, rtol=1e-4, atol=1e-6)
    # Fewer cached tokens than the vocabulary: a lower bound of the exact KL, row by row.
    top3 = adaptive_kl_loss(logits, cached_reference(ref, labels, rows, top_k=3), labels, beta, **kwargs)
    assert bool((top3.kl_per_example <= exact.kl_per_example + 1e-6).all()) and float(top3.kl) > 0


def test_a_cache_of_other_rows_is_refused():
    torch.manual_seed(4)
    logits, ref = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    labels = torch.randint(0, 7, (2, 6))
    labels[:, :2] = -100
    both = cached_reference(ref, labels, torch.tensor([0, 1]), top_k=7)
    with pytest.raises(DataError, match="cached reference holds"):
        adaptive_kl_loss(logits, both, labels, torch.tensor([0.5, 0.0]), reference_rows=torch.tensor([0]))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("top_k", [1, 4, 11])
def test_the_cached_kl_gradient_is_topk_kl_autograd(direction, top_k):
    """The loss's hand-written backward for a cached reference = autograd through topk_kl (k < V too)."""
    from lightning_safety.reference_cache import topk_kl

    torch.manual_seed(5)
    V = 11
    logits = (3 * torch.randn(2, 7, V)).requires_grad_()
    ref = 3 * torch.randn(2, 7, V)
    labels = torch.randint(0, V, (2, 7))
    labels[:, :2] = -100
    beta = torch.tensor([0.6, 0.3])
    cached = cached_reference(ref, labels, torch.tensor([0, 1]), top_k=top_k)
    out = adaptive_kl_loss(logits, cached, labels, beta, direction=direction, weighting="additive")
    (grad,) = torch.autograd.grad(out.loss, logits)
    rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    x = logits[rows, positions]
    nll = torch.logsumexp(x.float(), -1) - x.gather(-1, labels[:, 1:][rows, positions][:, None]).squeeze(-1)
    kl = topk_kl(x, cached, direction)
    count = (labels[:, 1:] != -100).sum()
    expected_loss = (nll.sum() + (beta[rows] * kl).sum()) / count
    (expected,) = torch.autograd.grad(expected_loss, logits)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
