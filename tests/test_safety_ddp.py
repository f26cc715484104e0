"""Safety evaluation under real 2-process DDP (gloo): each prompt generated once, metrics exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scripts import run_script

from lightning_safety.models import load_causal_lm, load_tokenizer

WORKER = Path(__file__).with_name("eval_ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2-lora"])
def test_ddp_evaluation_counts_each_prompt_once_and_equals_one_process(tiny_model_dir, tmp_path, mode):
    """DDP, and FSDP2 (generation from sharded weights, ranks in lockstep over uneven shares)."""
    from eval_ddp_worker import HARMFUL, SAFE, callback

    run_script(WORKER, tmp_path, tiny_model_dir, mode)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["sharded"] == mode.startswith("fsdp2")
    # Uneven, disjoint shares that cover every prompt once: no DistributedSampler padding duplicates.
    assert sorted(ranks[0]["harmful_indices"] + ranks[1]["harmful_indices"]) == list(range(len(HARMFUL)))
    assert (len(ranks[0]["harmful_indices"]), len(ranks[1]["harmful_indices"])) == (4, 3)
    assert sorted(ranks[0]["safe_indices"] + ranks[1]["safe_indices"]) == list(range(len(SAFE)))
    # Both ranks report the global numbers ...
    assert ranks[0]["totals"] == ranks[1]["totals"] and ranks[0]["logged"] == ranks[1]["logged"]
    assert ranks[0]["totals"]["safety/asr"] == 7 and ranks[0]["totals"]["safety/over_refusal"] == 5
    assert ranks[0]["totals"]["utility/sentiment"] == 7
    # ... equal to one process evaluating everything with the same model.
    single = callback().evaluator.evaluate(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    assert {name: r.count for name, r in single.rates.items()} == ranks[0]["counts"]
    for name, report in single.rates.items():
        assert abs(ranks[0]["logged"][name] - report.rate) < 1e-6, name
    asr = single.rates["safety/asr"].rate
    assert 0.0 < asr < 1.0, "the refusal strings should split the responses (else the test proves little)"
