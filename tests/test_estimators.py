"""The estimators' default training mix (package sets + topic pairs + borderline) and its benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_safety.demo_data import (
    default_estimator_data,
    harm_categories,
    load_demo_prompts,
    load_demo_rows,
    load_topic_pairs,
)
from lightning_safety.errors import DataError, JudgeError

REPO = Path(__file__).resolve().parents[1]


def _lower(prompts: list[str]) -> set[str]:
    return {p.lower() for p in prompts}


def test_default_mix_puts_each_pair_side_on_its_label():
    harmful, benign = default_estimator_data(framed=0)
    assert harmful and benign and not _lower(harmful) & _lower(benign)
    assert len(harmful) == len(set(harmful)) and len(benign) == len(set(benign))
    pairs = load_topic_pairs()
    assert {row["harmful"] for row in pairs} <= set(harmful)
    assert {row["benign"] for row in pairs} <= set(benign)
    assert not {row["harmful"] for row in pairs} & set(benign)  # no harmful side among the negatives
    assert set(load_demo_prompts("harmful")) <= set(harmful)
    assert set(load_demo_prompts("benign")) | set(load_demo_prompts("borderline")) <= set(benign)
    assert (len(harmful), len(benign)) == (120 + 240, 120 + 240 + 96)
    # The default also holds a wrapped copy of each (tests/test_estimator_data.py checks the copies).
    framed_h, framed_b = default_estimator_data()
    assert (framed_h[: len(harmful)], framed_b[: len(benign)]) == (harmful, benign)
    assert (len(framed_h), len(framed_b)) == (2 * len(harmful), 2 * len(benign))


def test_category_filter_holds_out_a_category_entirely():
    held = "fraud"
    harmful, benign = default_estimator_data(exclude_categories=[held], framed=0)
    texts = set(harmful) | set(benign)
    assert not {r["prompt"] for r in load_demo_rows("harmful") if r["category"] == held} & texts
    held_pairs = load_topic_pairs([held])
    assert not {r["harmful"] for r in held_pairs} & texts and not {r["benign"] for r in held_pairs} & texts
    others = [r for r in load_topic_pairs() if r["category"] != held]
    assert {r["harmful"] for r in others} <= set(harmful) and {r["benign"] for r in others} <= set(benign)
    assert len(harmful) == 360 - 10 - 20 and len(benign) == 456 - 20
    with pytest.raises(DataError, match="unknown categories"):
        default_estimator_data(exclude_categories=["fraudd"])


def test_given_sets_and_a_prefix_of_pairs():
    harmful, benign = default_estimator_data(["Harm A", "harm a", "Harm B"], ["Fine A"], [], pairs=24, framed=0)
    pairs = load_topic_pairs()[:24]
    assert {r["category"] for r in pairs} == set(harm_categories())  # a prefix covers every category
    assert harmful == ["Harm A", "Harm B", *(r["harmful"] for r in pairs)]  # repeats dropped, order kept
    assert benign == ["Fine A", *(r["benign"] for r in pairs)]
    harmful, benign = default_estimator_data(pairs=0, borderline=[], framed=0)
    assert (harmful, benign) == (load_demo_prompts("harmful"), load_demo_prompts("benign"))
    with pytest.raises(DataError, match="both harmful and benign"):
        default_estimator_data(["Same prompt"], ["same prompt"])
    with pytest.raises(DataError, match="pairs=-1"):
        default_estimator_data(pairs=-1)


def test_judge_fit_on_embeddings_computed_once_is_fit_on_the_texts():
    from lightning_safety.risk.judges.embedding import EmbeddingJudge
    from lightning_safety.risk.text import sanitize_for_judge

    harmful, benign = default_estimator_data(pairs=12, borderline=[], framed=0)
    harmful, benign = harmful[:24] + harmful[-12:], benign[:24] + benign[-12:]
    judge = EmbeddingJudge(device="cpu")
    metrics = judge.fit(harmful, benign, seed=0)
    test = load_demo_prompts("borderline")[:8] + load_demo_prompts("harmful")[-8:]
    expected = judge.score(test).score
    embedded = judge.embed([sanitize_for_judge(t, judge.tokenizer) for t in harmful + benign])
    assert judge.fit(embedded[: len(harmful)], embedded[len(harmful) :], seed=0) == metrics
    torch.testing.assert_close(judge.score(test).score, expected, atol=1e-6, rtol=0)
    with pytest.raises(JudgeError, match="texts on one side and embeddings on the other"):
        judge.fit(embedded[:4], benign[:4])


@pytest.mark.slow
def test_estimators_benchmark_quick_on_the_tiny_model(tmp_path, shared_data):
    """Every mix, split and candidate is measured and written; the cached-feature estimators are the library's."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "estimators.py"), "--quick", "--model", "tiny-random-llama",
         "--data-dir", str(shared_data), "--out-dir", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "estimators.json").read_text())
    assert result["command"] == "python benchmarks/estimators.py --quick --model tiny-random-llama"
    assert result["check_values"]["probe_vs_fit_probe"] < 1e-4 and result["check_values"]["judge_vs_fit"] < 1e-4
    assert result["mix_sizes"]["after"] == {"harmful": 360, "benign": 456}
    assert result["mix_sizes"]["base"] == {"harmful": 120, "benign": 120}
    assert result["mix_sizes"]["after_framed"] == {"harmful": 720, "benign": 912}
    mixes = ("base", "before", "pairs", "after", "before_framed", "pairs_framed", "after_framed", "after_framed120")
    rows = {(row["label"].split(" (")[0], row["mix"]) for row in result["headline"]}
    refusal, both = "refusal probability", "max(probe default, refusal probability"
    assert rows == {("probe, default", m) for m in mixes} | {
        ("probe, chosen", m) for m in ("before", "after", "after_framed")} | {("EmbeddingJudge", m) for m in mixes} | {
        (refusal, "before")} | {(both, m) for m in ("before", "after", "after_framed")}
    # MaxRisk only raises a probability: recall and FPR at 0.5 of the max are at least the probe's on every split
    by = {(row["label"].split(" (")[0], row["mix"]): row["result"] for row in result["headline"]}
    for mix in ("before", "after", "after_framed"):
        for split in ("advbench_alpaca", "xstest", "zoo_frames"):
            for key in ("recall", "fpr"):
                assert by[(both, mix)][split][key] >= by[("probe, default", mix)][split][key]
                assert by[(both, mix)][split][key] >= by[(refusal, "before")][split][key]
    for row in result["headline"]:
        r = row["result"]
        assert set(r["loco"]["by_category"]) == set(harm_categories())
        assert all(e["n_harmful"] == e["n_benign"] == 20 for e in r["loco"]["by_category"].values())
        assert r["loco"]["worst"] <= r["loco"]["auroc"] and r["loco"]["worst_category"] in harm_categories()
        for split in ("id", "id_pairs", "advbench_alpaca", "xstest", "advbench_xstest_safe", "zoo_frames"):
            assert 0.0 <= r[split]["auroc"] <= 1.0 and 0.0 <= r[split]["recall"] <= 1.0 and 0.0 <= r[split]["fpr"] <= 1.0
        assert r["advbench_alpaca"]["n_harmful"] == r["advbench_alpaca"]["n_benign"] == 20
        by_frame = r["zoo_frames"]["by_frame"]  # the zoo's 7 frames, 20 framed AdvBench vs 20 framed Alpaca each
        assert list(by_frame) == result["zoo_frames"] and len(by_frame) == 7
        assert all(e["n_harmful"] == e["n_benign"] == 20 for e in by_frame.values())
        lo, hi = r["xstest"]["ci95"]
        assert lo <= hi
    assert any(c["features"] + ", logistic" in result["chosen_features"] for c in result["candidates"])
    assert [c["weight_decay"] for c in result["judge_candidates"]] == [0.01, 0.1, 1.0, 10.0]
    # after - before, after_framed - after, after_framed - before for four estimators, after - pairs for two
    assert len(result["differences"]) == 14
    text = (out / "estimators.md").read_text()
    assert "## AUROC by split" in text and "| EmbeddingJudge (all-MiniLM-L6-v2) | `after` |" in text
    assert "## Disguised requests: the attack zoo's frames (never trained on)" in text
