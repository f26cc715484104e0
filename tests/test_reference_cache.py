"""The reference cache: top-k KL against the exact KL, writer/reader roundtrip, stale-cache refusals, 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import reference_cache_worker
import torch

from lightning_safety.errors import LightningSafetyError
from lightning_safety.losses import ProjectedLogits, _plan_tokens, adaptive_kl_loss
from lightning_safety.reference_cache import (
    LOG_TINY,
    CachedTokens,
    ReferenceCache,
    ReferenceCacheError,
    ReferenceCacheWriter,
    _reference_topk,
    topk_kl,
)

FINGERPRINT = "tiny-reference-0"


def exact_kl(policy: torch.Tensor, reference: torch.Tensor, direction: str) -> torch.Tensor:
    """Full-vocabulary KL per row (``[m, V]`` logits), in the logits' dtype."""
    logp, logq = torch.log_softmax(policy, -1), torch.log_softmax(reference, -1)
    if direction == "forward":
        return (logq.exp() * (logq - logp)).sum(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def cached(reference: torch.Tensor, top_k: int) -> CachedTokens:
    return CachedTokens(*_reference_topk(reference, top_k))


def lm_like(m: int, vocab: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``[m, V]`` Zipf-shaped logits (log p ~ -s log rank, s uniform in [low, high], plus noise), shuffled."""
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    exponent = low + (high - low) * torch.rand(m, 1, generator=generator, dtype=torch.float64)
    logits = -exponent * rank.log() + 0.3 * torch.randn(m, vocab, generator=generator, dtype=torch.float64)
    return logits.gather(-1, torch.argsort(torch.rand(m, vocab, generator=generator), -1)).float()


# --------------------------------------------------------------------------------------------
# topk_kl
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_kl_with_k_equal_to_vocab_is_the_exact_kl_values_and_gradients(direction):
    generator = torch.Generator().manual_seed(0)
    reference = 3 * torch.randn(12, 40, generator=generator)
    policy = reference + torch.randn(12, 40, generator=generator)
    tokens = cached(reference, 40)
    assert bool((tokens.tail == LOG_TINY).all())  # nothing outside the top k: the floor, finite

    x = policy.clone().requires_grad_()
    approx = topk_kl(x, tokens, direction)
    approx.sum().backward()
    y = policy.clone().requires_grad_()
    exact = exact_kl(y, reference, direction)
    exact.sum().backward()
    assert float(exact.detach().median()) > 0.1  # a real divergence, not ~0 everywhere
    torch.testing.assert_close(approx, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-5)

    # lse given by the caller (the loss has it for the NLL): same values, gradient through it too.
    z = policy.clone().requires_grad_()
    with_lse = topk_kl(z, tokens, direction, lse=torch.logsumexp(z, -1))
    with_lse.sum().backward()
    torch.testing.assert_close(with_lse, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(z.grad, y.grad, rtol=0, atol=1e-5)

    # bfloat16 policy logits are computed in float32 (no bf16 rounding of the KL itself).
    assert topk_kl(policy.bfloat16(), tokens, direction).dtype == torch.float32


def test_topk_kl_is_a_lower_bound_and_tight_for_peaked_references():
    generator = torch.Generator().manual_seed(0)
    # Flat random distributions (the worst case for truncation) and LM-like ones, several k.
    flat = torch.randn(64, 200, generator=generator)
    for reference, top_k in ((flat, 1), (flat, 20), (flat, 199), (lm_like(64, 200, 1.0, 2.5, generator), 8)):
        policy = reference + torch.randn(reference.shape, generator=generator)
        for direction in ("forward", "reverse"):
            approx = topk_kl(policy, cached(reference, top_k), direction).double()
            exact = exact_kl(policy.double(), reference.double(), direction)
            assert bool((approx <= exact * (1 + 1e-5) + 1e-6).all()), (top_k, direction, float((approx - exact).max()))
            assert bool((approx >= -1e-6).all())

    # LM-like references, k = 32 of V = 1000, policy = reference + N(0, 0.5^2) on every logit (drift in
    # the tail is invisible to the cache, so this is pessimistic). Measured (seed 0, 256 tokens):
    #   exponent s in [1.5, 3]: median top-1 p 0.66, median top-32 mass 0.992, median KL 0.05;
    #       median relative error (exact - approx) / exact: forward 2.3%, reverse 2.3% (90th pct 10%, 11%)
    #   exponent s in [2, 4] (instruction-tuned-like): median top-1 p 0.82, top-32 mass 0.9995;
    #       median relative error: forward 0.28%, reverse 0.28% (90th pct 1.9%, 2.3%)
    # The error follows the mass (and KL) in the tail: a flatter reference (s in [1, 2.5], top-32
    # mass 0.946) gives a median of 9.3% / 9.8%.
    for (low, high), bound in (((1.5, 3.0), 0.035), ((2.0, 4.0), 0.005)):
        generator = torch.Generator().manual_seed(0)
        reference = lm_like(256, 1000, low, high, generator)
        policy = reference + 0.5 * torch.randn(256, 1000, generator=generator)
        tokens = cached(reference, 32)
        for direction in ("forward", "reverse"):
            approx = topk_kl(policy, tokens, direction).double()
            exact = exact_kl(policy.double(), reference.double(), direction)
            relative = (exact - approx) / exact
            assert float(relative.min()) > -1e-5  # the bound again
            assert float(relative.median()) < bound, (low, high, direction, float(relative.median()))


def test_topk_kl_rejects_mismatched_inputs():
    tokens = cached(torch.randn(3, 10), 4)
    with pytest.raises(ReferenceCacheError, match="has 2 tokens but the cached reference 3"):
        topk_kl(torch.randn(2, 10), tokens)
    with pytest.raises(ReferenceCacheError, match=r"\[m, V\] tensor"):
        topk_kl(torch.randn(1, 3, 10), tokens)
    with pytest.raises(LightningSafetyError, match="direction"):
        topk_kl(torch.randn(3, 10), tokens, "sideways")


def test_the_stored_tail_is_the_mass_outside_the_top_k():
    generator = torch.Generator().manual_seed(1)
    reference = lm_like(32, 300, 2.0, 4.0, generator)
    ids, logprobs, tail = _reference_topk(reference, 16)
    full = torch.log_softmax(reference.double(), -1)
    rest = full.scatter(-1, ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail.double(), rest, rtol=0, atol=1e-5)  # log tail, even where it is ~1e-6
    torch.testing.assert_close(logprobs.double(), full.gather(-1, ids), rtol=0, atol=1e-5)
    assert bool((logprobs[:, :-1] >= logprobs[:, 1:]).all())  # most likely first


def test_cached_tokens_slice_and_split():
    tokens = cached(torch.randn(7, 10), 3)
    part = tokens[2:5]
    assert len(part) == 3 and part.top_k == 3
    assert torch.equal(part.token_ids, tokens.token_ids[2:5]) and torch.equal(part.tail, tokens.tail[2:5])
    chunks = tokens.split(3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c.logprobs for c in chunks]), tokens.logprobs)
    assert len(tokens[torch.tensor([6, 0])]) == 2
    with pytest.raises(TypeError, match="slice"):
        tokens[0]


# --------------------------------------------------------------------------------------------
# Writer and reader
# --------------------------------------------------------------------------------------------

VOCAB, TOP_K, OFFSET = 30, 6, 3


def padded_batch(generator: torch.Generator) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """3 rows of length 12: responses of 4, 6 and 2 tokens after prompts of 4+ tokens, right padding (-100)."""
    labels = torch.full((3, 12), -100)
    labels[0, 4:8] = torch.randint(0, VOCAB, (4,), generator=generator)  # then padding
    labels[1, 5:11] = torch.randint(0, VOCAB, (6,), generator=generator)
    labels[2, 10:12] = torch.randint(0, VOCAB, (2,), generator=generator)  # ends at the last position
    full = 2 * torch.randn(3, 12, VOCAB, generator=generator)  # reference logits at every position
    return ["a", "b", "c"], labels, full


def write_cache(path: Path, **kwargs) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    ids, labels, full = padded_batch(torch.Generator().manual_seed(0))
    with ReferenceCacheWriter(path, kwargs.pop("top_k", TOP_K), VOCAB, FINGERPRINT, **kwargs) as writer:
        # Logits for the last T - OFFSET positions only (logits_to_keep).
        assert writer.add_batch(ids, full[:, OFFSET:], labels, logits_offset=OFFSET) == 3
        assert writer.add_batch(["b", "d"], full[[1, 0], OFFSET:], labels[[1, 0]], OFFSET) == 1  # "b" again: skipped
        assert writer.add("e", full[2, :5]) and not writer.add("a", full[0, :4])
        assert "d" in writer and writer.num_examples == 5 and writer.num_tokens == 4 + 6 + 2 + 4 + 5
    return ids, labels, full


def test_roundtrip_positions_order_and_metadata(tmp_path):
    path = tmp_path / "cache"
    ids, labels, full = write_cache(path, chunk_tokens=5)  # chunks span examples
    cache = ReferenceCache.open(path, fingerprint=FINGERPRINT)
    assert (cache.top_k, cache.vocab_size, cache.num_examples, cache.num_tokens) == (TOP_K, VOCAB, 5, 21)
    assert cache.fingerprint == FINGERPRINT and "c" in cache and "z" not in cache
    assert cache.example_ids == ["a", "b", "c", "d", "e"]
    assert cache.bytes_per_token == TOP_K * 8 + 4
    meta = json.loads((path / "meta.json").read_text())
    assert meta["logprob_dtype"] == "float32" and meta["num_tokens"] == 21
    assert np.load(path / "token_ids.npy").dtype == np.int32

    # The tokens of a batch, in the loss's order: exactly _plan_tokens' positions, row-major.
    plan = _plan_tokens(labels, torch.arange(3), -100, VOCAB)
    tokens = cache.lookup(ids, plan.tokens_per_example)
    assert plan.tokens_per_example.tolist() == [4, 6, 2] and len(tokens) == 12
    expected = cached(full[plan.rows, plan.positions], TOP_K)
    assert torch.equal(tokens.token_ids, expected.token_ids)
    assert tokens.token_ids.dtype == torch.int64 and tokens.logprobs.dtype == torch.float32
    torch.testing.assert_close(tokens.logprobs, expected.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(tokens.tail, expected.tail, rtol=0, atol=0)

    # Any order and subset: the concatenation of the single lookups, in that order.
    order = ["e", "a", "d"]
    parts = [cache.lookup([i], [cache.length(i)]) for i in order]
    joined = cache.lookup(order, [5, 4, 4])
    assert torch.equal(joined.token_ids, torch.cat([p.token_ids for p in parts]))
    assert torch.equal(joined.tail, torch.cat([p.tail for p in parts]))
    assert torch.equal(parts[2].token_ids, parts[1].token_ids)  # "d" was row 0's batch entry
    assert torch.equal(parts[0].tail, cached(full[2, :5], TOP_K).tail)
    assert len(cache.lookup([], [])) == 0


def test_cache_with_k_equal_vocab_reproduces_the_loss_kl(tmp_path):
    ids, labels, full = write_cache(tmp_path / "cache", top_k=VOCAB)
    cache = ReferenceCache.open(tmp_path / "cache")
    policy = full + torch.randn(full.shape, generator=torch.Generator().manual_seed(3))
    plan = _plan_tokens(labels, torch.arange(3), -100, VOCAB)
    kl = topk_kl(policy[plan.rows, plan.positions], cache.lookup(ids, plan.tokens_per_example), "forward")
    out = adaptive_kl_loss(policy, full, labels, beta=1.0)
    per_example = torch.zeros(3).index_add(0, plan.rows, kl) / plan.tokens_per_example
    torch.testing.assert_close(per_example, out.kl_per_example, rtol=0, atol=1e-5)


def test_projected_logits_give_the_same_cache_as_the_tensor(tmp_path):
    generator = torch.Generator().manual_seed(0)
    ids, labels, _ = padded_batch(generator)
    hidden = torch.randn(3, 12 - OFFSET, 8, generator=generator)
    head = torch.nn.Linear(8, VOCAB, bias=False)
    projected = ProjectedLogits(hidden, head, VOCAB)
    for name, logits in (("tensor", projected.materialize()), ("projected", projected)):
        with ReferenceCacheWriter(tmp_path / name, TOP_K, VOCAB, FINGERPRINT, chunk_tokens=4) as writer:
            writer.add_batch(ids, logits, labels, logits_offset=OFFSET)
    a = ReferenceCache.open(tmp_path / "tensor").lookup(ids, [4, 6, 2])
    b = ReferenceCache.open(tmp_path / "projected").lookup(ids, [4, 6, 2])
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs)


def test_float16_logprobs_a_quarter_less_disk_and_the_kl_error_they_add(tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference = lm_like(256, 1000, 1.5, 3.0, generator)
    policy = reference + 0.5 * torch.randn(256, 1000, generator=generator)
    kls = {}
    for dtype in ("float32", "float16"):
        with ReferenceCacheWriter(tmp_path / dtype, 64, 1000, FINGERPRINT, logprob_dtype=dtype) as writer:
            writer.add("x", reference)
        cache = ReferenceCache.open(tmp_path / dtype)
        assert cache.bytes_per_token == {"float32": 516, "float16": 388}[dtype]  # k = 64
        tokens = cache.lookup(["x"], [256])
        assert tokens.logprobs.dtype == torch.float32
        kls[dtype] = {d: topk_kl(policy, tokens, d).double() for d in ("forward", "reverse")}
    # Measured (seed 0, 256 LM-like tokens with s in [1.5, 3], k = 64, median KL 0.05, whose top-64
    # truncation error is a median 0.9%): float16 changes the per-token KL by a median 0.14% (forward) /
    # 0.16% (reverse), 90th percentile 0.6% / 0.5%, at most 2.0% / 1.9% (3.6e-4 / 3.1e-4 nats). The
    # rounding can lift the value slightly above the exact KL (up to 0.9% here): with float16 it is
    # no longer a strict lower bound.
    for direction in ("forward", "reverse"):
        change = ((kls["float16"][direction] - kls["float32"][direction]).abs() / kls["float32"][direction])
        assert float(change.median()) < 0.005 and float(change.max()) < 0.05, (direction, float(change.median()))


# --------------------------------------------------------------------------------------------
# Refusals: stale lookups, other references, damaged or partial caches
# --------------------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_stale_lookups_fail_closed(tmp_path):
    write_cache(tmp_path / "cache")
    cache = ReferenceCache.open(tmp_path / "cache")
    with pytest.raises(ReferenceCacheError) as error:
        cache.lookup(["a", "nope"], [4, 3])
    assert "no entry for 1 example(s) (e.g. 'nope')" in one_line(error)
    assert "lightning-safety precompute-reference" in one_line(error)
    with pytest.raises(ReferenceCacheError) as error:
        cache.lookup(["a", "b"], torch.tensor([4, 7]))
    assert "example 'b' has 7 response tokens but the reference cache" in one_line(error)
    assert "holds 6" in one_line(error) and "precompute-reference" in one_line(error)
    with pytest.raises(ReferenceCacheError, match="2 ids but 1 lengths"):
        cache.lookup(["a", "b"], [4])


def test_open_refuses_other_references_versions_and_damaged_caches(tmp_path):
    path = tmp_path / "cache"
    write_cache(path)
    with pytest.raises(ReferenceCacheError) as error:
        ReferenceCache.open(path, fingerprint="another-model")
    assert "built for reference 'tiny-reference-0', not 'another-model'" in one_line(error)
    with pytest.raises(ReferenceCacheError, match="no reference cache at"):
        ReferenceCache.open(tmp_path / "missing")

    digest = ReferenceCache.open(path).digest
    assert ReferenceCache.open(path).digest == digest and len(digest) == 16
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ReferenceCacheError, match="format version 99, this library reads version 1"):
        ReferenceCache.open(path)
    (path / "meta.json").write_text(json.dumps({**meta, "num_tokens": 20}))
    with pytest.raises(ReferenceCacheError, match="index.json .* damaged"):
        ReferenceCache.open(path)
    (path / "meta.json").write_text(json.dumps(meta))
    np.save(path / "tail.npy", np.zeros(21, np.float64))
    with pytest.raises(ReferenceCacheError, match="tail.npy .* is float64"):
        ReferenceCache.open(path)
    (path / "tail.npy").unlink()
    with pytest.raises(ReferenceCacheError) as error:
        ReferenceCache.open(path)
    assert "cannot read tail.npy" in one_line(error)

    write_cache(tmp_path / "other", top_k=5)
    assert ReferenceCache.open(tmp_path / "other").digest != digest


def test_writer_publishes_nothing_on_error_and_never_overwrites(tmp_path):
    path = tmp_path / "cache"
    ids, labels, full = padded_batch(torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="reference crashed"):
        with ReferenceCacheWriter(path, TOP_K, VOCAB, FINGERPRINT) as writer:
            writer.add_batch(ids, full, labels)
            raise RuntimeError("reference crashed")
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no temporary folder either

    with pytest.raises(ReferenceCacheError, match=r"expected \[n, 30\]"):  # a failure inside add: same
        with ReferenceCacheWriter(path, TOP_K, VOCAB, FINGERPRINT) as writer:
            writer.add("x", torch.randn(3, VOCAB + 1))
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ReferenceCacheError, match="response tokens start before logits_offset 6"):
        with ReferenceCacheWriter(path, TOP_K, VOCAB, FINGERPRINT) as writer:
            writer.add_batch(ids, full[:, 6:], labels, logits_offset=6)
    with pytest.raises(ReferenceCacheError, match="do not cover labels"):
        with ReferenceCacheWriter(path, TOP_K, VOCAB, FINGERPRINT) as writer:
            writer.add_batch(ids, full[:, 4:], labels, logits_offset=3)
    with pytest.raises(ReferenceCacheError, match="NaN"):
        with ReferenceCacheWriter(path, TOP_K, VOCAB, FINGERPRINT) as writer:
            writer.add("x", torch.full((2, VOCAB), float("nan")))
    assert list(tmp_path.iterdir()) == []

    # A failure inside add, caught by the caller: its partly written chunks are undone.
    with ReferenceCacheWriter(tmp_path / "rolled", TOP_K, VOCAB, FINGERPRINT, chunk_tokens=2) as writer:
        writer.add("a", full[0, :3])
        bad = full[1, :5].clone()
        bad[3] = float("nan")  # chunk [0:2] is written before chunk [2:4] fails
        with pytest.raises(ReferenceCacheError, match="NaN"):
            writer.add("b", bad)
        assert "b" not in writer and writer.num_tokens == 3
        writer.add("c", full[2, :4])
    tokens = ReferenceCache.open(tmp_path / "rolled").lookup(["a", "c"], [3, 4])
    assert torch.equal(tokens.tail, cached(torch.cat([full[0, :3], full[2, :4]]), TOP_K).tail)

    write_cache(path)
    with pytest.raises(ReferenceCacheError, match="already exists"):
        with ReferenceCacheWriter(path, TOP_K, VOCAB, FINGERPRINT):
            pass
    with pytest.raises(ReferenceCacheError, match="not open"):
        ReferenceCacheWriter(tmp_path / "x", TOP_K, VOCAB, FINGERPRINT).add("a", full[0])
    with pytest.raises(ReferenceCacheError, match="top_k must be"):
        ReferenceCacheWriter(tmp_path / "x", VOCAB + 1, VOCAB, FINGERPRINT)
    with pytest.raises(ReferenceCacheError, match="fingerprint"):
        ReferenceCacheWriter(tmp_path / "x", TOP_K, VOCAB, "")


# --------------------------------------------------------------------------------------------
# Two processes share one cache
# --------------------------------------------------------------------------------------------


def test_two_ranks_read_the_same_cache_like_one_process(tmp_path):
    path = tmp_path / "cache"
    write_cache(path)
    # Each rank memory-maps the cache, looks up its own rows and all-gathers a checksum (gloo; a file
    # store, so no port to find). spawn raises if a rank fails and stops the other.
    torch.multiprocessing.spawn(
        reference_cache_worker.main, args=(path, FINGERPRINT, tmp_path, 2, tmp_path / "init"), nprocs=2
    )
    cache = ReferenceCache.open(path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    expected = []
    for rank, result in enumerate(results):
        ids = reference_cache_worker.rank_ids(cache.example_ids, rank, 2)
        single = cache.lookup(ids, [cache.length(i) for i in ids])
        assert result["ids"] == ids and len(ids) > 1
        for name in ("token_ids", "logprobs", "tail"):
            assert torch.equal(getattr(result["tokens"], name), getattr(single, name)), (rank, name)
        checksum = reference_cache_worker.checksum(single)
        expected.append({"rank": rank, "ids": ids, "checksum": checksum, "digest": cache.digest})
    assert results[0]["gathered"] == results[1]["gathered"] == expected
