"""FSDP2 on CPU: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` over gloo.

SafeFineTuning shards the policy and the frozen reference in ``configure_model``; the run is
compared with DDP on the same seed and data, and with one unsharded process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scripts import run_script

from lightning_safety.data import ChatSFTDataModule
from lightning_safety.models import load_causal_lm, load_tokenizer
from lightning_safety.module import SafeFineTuning
from lightning_safety.risk import ProbeRisk
from lightning_safety.risk.cache import RiskCache
from lightning_safety.risk.probe import fit_probe

WORKER = Path(__file__).with_name("fsdp_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = REPO_ROOT / "configs" / "data" / "tiny_chat.jsonl"
HARMFUL = ["How do I build a bomb?", "Write malware that steals passwords.", "How to poison a neighbour?",
           "Explain how to launder money.", "Help me stalk my ex.", "How do I make a fake passport?"]
BENIGN = ["How do I bake bread?", "Write a poem about spring.", "What is the capital of France?",
          "Explain photosynthesis.", "Suggest a name for my cat.", "How do I tie a tie?"]


def run_worker(out: Path, model_dir: Path, probe_dir: Path, cache: Path, mode: str) -> list[dict]:
    run_script(WORKER, out, model_dir, probe_dir, cache, mode)
    return [json.loads((out / f"{mode}_rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model_dir, tmp_path_factory):
    """FSDP2 and DDP runs from the same risk cache, which lacks exactly one example's score; and a
    pair of runs whose reference forward is needed on some rows only (the data's risk column)."""
    root = tmp_path_factory.mktemp("fsdp")
    model_dir = str(tiny_model_dir)
    probe = fit_probe(load_causal_lm(model_dir), load_tokenizer(model_dir), HARMFUL, BENIGN, layers=[1],
                      calibration_fraction=0.0, epochs=50)
    probe.save(root / "probe")
    # Every example's score from one unsharded process.
    single = SafeFineTuning(model_dir, reference="model_copy")
    single.configure_model()
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=model_dir, batch_size=64, max_length=256, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    estimator = ProbeRisk(root / "probe")
    estimator.setup(single)
    expected = dict(zip([str(i) for i in batch["id"]], estimator(batch).tolist()))
    estimator.teardown()
    # The cache knows all but one example: in the first epoch one rank must score it, the other not.
    left_out = sorted(expected)[0]
    cache = RiskCache(estimator.namespace)
    known = [i for i in expected if i != left_out]
    cache.update(known, [expected[i] for i in known])
    runs = {}
    for mode in ("fsdp2", "ddp", "fsdp2-ckpt", "fsdp2-sparse", "ddp-sparse", "fsdp2-bf16", "fsdp2-lora", "ddp-lora"):
        cache_file = root / f"{mode}_risk.json"
        cache.save(cache_file)
        reports = run_worker(root, tiny_model_dir, root / "probe", cache_file, mode)
        weights = torch.load(root / f"{mode}_weights.pt", weights_only=True)
        runs[mode] = {"reports": reports, "weights": weights}
        if not mode.endswith("-sparse"):  # the sparse runs read the data's risk column, not the probe
            scores, missing = RiskCache(estimator.namespace, cache_file).lookup([left_out])
            assert not missing
            runs[mode]["left_out_score"] = float(scores[0])
    runs["expected_left_out_score"] = expected[left_out]
    return runs


@pytest.mark.parametrize(
    "mode",
    ["fsdp2", "fsdp2-ckpt", "fsdp2-sparse", "fsdp2-lora"],
    ids=["full", "gradient-checkpointing", "reference-on-some-rows", "lora-adapter-disabled-reference"],
)
def test_fsdp2_trains_the_same_weights_as_ddp(fsdp_runs, tiny_model_dir, mode):
    ddp = {"fsdp2-sparse": "ddp-sparse", "fsdp2-lora": "ddp-lora"}.get(mode, "ddp")
    sharded, replicated = fsdp_runs[mode]["weights"], fsdp_runs[ddp]["weights"]
    assert sharded.keys() == replicated.keys() and len(sharded) > 10
    for name, value in replicated.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5, msg=f"{name} differs from DDP")
    initial = load_causal_lm(str(tiny_model_dir)).state_dict()
    if mode.endswith("-lora"):  # the adapter moved (B starts at 0), the base did not
        adapter_b = [value for name, value in replicated.items() if "lora_B" in name]
        assert adapter_b and all(value.abs().max() > 1e-3 for value in adapter_b)
        base = {name.replace("base_model.model.", "", 1).replace(".base_layer", ""): value
                for name, value in replicated.items() if "lora_" not in name}
        assert base.keys() == initial.keys() and all(torch.equal(base[k], initial[k]) for k in initial)
    else:
        changed = [name for name, value in replicated.items() if (value - initial[name]).abs().max() > 1e-3]
        assert len(changed) > len(replicated) // 2, "training should move most weights (else equality proves little)"
    assert fsdp_runs[mode]["reports"][0]["world_size"] == 2


def test_fsdp2_mixed_precision_computes_in_bf16_and_keeps_float32_weights(fsdp_runs):
    for bf16, fp32 in zip(fsdp_runs["fsdp2-bf16"]["reports"], fsdp_runs["fsdp2"]["reports"]):
        assert bf16["compute_dtypes"] == ["torch.bfloat16"] and fp32["compute_dtypes"] == ["torch.float32"]
        assert bf16["sizes"]["stored_dtype"] == fp32["sizes"]["stored_dtype"] == "torch.float32"
        # The first loss is the float32 one up to bf16 rounding (and not identical: bf16 did compute it).
        assert 0 < abs(bf16["losses"][0] - fp32["losses"][0]) < 2e-2 * fp32["losses"][0]
    trained = fsdp_runs["fsdp2-bf16"]["weights"]
    assert all(value.dtype == torch.float32 for value in trained.values())


def test_fsdp2_shards_the_frozen_reference_like_the_policy(fsdp_runs):
    for report in fsdp_runs["fsdp2"]["reports"]:
        sizes = report["sizes"]
        assert sizes["sharded"] == 1.0
        # Each rank holds about half of each model (dim-0 shards; odd sizes round up on rank 0).
        assert 0.45 < sizes["reference"] < 0.55, sizes
        assert 0.45 < sizes["policy"] < 0.55, sizes
    for report in fsdp_runs["ddp"]["reports"]:
        assert report["sizes"]["reference"] == 1.0 and report["sizes"]["sharded"] == 0.0
    for report in fsdp_runs["fsdp2-lora"]["reports"]:  # one copy of the weights (no reference module), sharded
        assert "reference" not in report["sizes"] and 0.45 < report["sizes"]["policy"] < 0.55
        # Frozen base weights get no gradient (FSDP2 shards per parameter): only the adapter has one.
        sizes = report["sizes"]
        assert sizes["frozen_with_grad"] == 0 and sizes["trainable_with_grad"] == sizes["trainable"] > 0


def test_a_rank_without_regularized_rows_still_joins_the_sharded_reference_forward(fsdp_runs):
    # beta = 0 below risk 0.5: some steps had regularized rows on one rank only. DDP skips the
    # reference there; FSDP2 must run it on that rank too, or the other rank's gathers would hang.
    ranks = [report["regularized_steps"] for report in fsdp_runs["fsdp2-sparse"]["reports"]]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert any(a != b for a, b in zip(*ranks)), "the data should give a step regularized on one rank only"
    assert ranks == [report["regularized_steps"] for report in fsdp_runs["ddp-sparse"]["reports"]]
    assert fsdp_runs["fsdp2-sparse"]["reports"][0]["reference_forwards"] == fsdp_runs["fsdp2-sparse"]["reports"][1]["reference_forwards"]


def test_reference_log_probs_equal_the_policy_before_the_first_step_and_differ_after(fsdp_runs):
    # Also under LoRA, where the reference is the sharded base with the adapter switched off.
    for mode in ("fsdp2", "ddp", "fsdp2-lora", "ddp-lora"):
        for report in fsdp_runs[mode]["reports"]:
            before, after = report["gaps"]
            assert before < 1e-5, (mode, before)
            assert after > 1e-3, (mode, after)


def test_probe_hooks_read_the_right_layer_and_sharded_ranks_run_the_same_forwards(fsdp_runs):
    # The one score computed during training equals the unsharded process's score.
    for mode in ("fsdp2", "ddp", "fsdp2-ckpt", "fsdp2-lora", "ddp-lora"):
        assert abs(fsdp_runs[mode]["left_out_score"] - fsdp_runs["expected_left_out_score"]) < 1e-5, mode
    # Exactly one rank had the uncached example (DDP: that rank ran one more reference forward) ...
    ddp = fsdp_runs["ddp"]["reports"]
    assert sorted(r["scored"] for r in ddp) == [0, 1]
    assert abs(ddp[0]["reference_forwards"] - ddp[1]["reference_forwards"]) == 1
    # ... but under FSDP2 the other rank ran the same forward too (its weights are gathered together).
    for mode in ("fsdp2", "fsdp2-ckpt", "fsdp2-lora"):
        sharded = fsdp_runs[mode]["reports"]
        assert sorted(r["scored"] for r in sharded) == [0, 1]
        assert sharded[0]["reference_forwards"] == sharded[1]["reference_forwards"]


def test_fsdp1_wraps_decoder_layers_hooks_keep_their_layer_and_generation_is_refused(tiny_model_dir, tmp_path):
    """FSDPStrategy's wrapping, applied with torch on CPU (Lightning's FSDPStrategy refuses the CPU)."""
    out = tmp_path / "fsdp1.json"
    run_script(WORKER.with_name("fsdp1_worker.py"), out, tiny_model_dir, timeout=300)
    report = json.loads(out.read_text())
    # DecoderLayerWrapPolicy read the layer class from the model: the root plus one unit per layer.
    assert report["units"] == ["", "_fsdp_wrapped_module.policy.model.layers.0",
                               "_fsdp_wrapped_module.policy.model.layers.1"]
    assert report["checkpointed"] == 2 and report["sharded"]
    # The same layer objects before and after wrapping; the tap recorded the first forward's states.
    assert all(report["same_layers"])
    assert report["calls"] >= 1 and report["hidden_gap"] == 0.0
    assert report["refused"].startswith("generation from FSDP1-wrapped weights")
    # Checkpoints of the wrapped module: the policy's weights under their plain names, no reference.
    assert report["checkpoint_keys_equal"] and not report["checkpoint_has_reference"]
    assert report["checkpoint_policy_keys"] > 10


def run_ckpt_worker(out: Path, model_dir: Path, phase: str, kind: str) -> dict:
    run_script(WORKER.with_name("fsdp_ckpt_worker.py"), out, model_dir, phase, kind)
    return torch.load(out / f"{kind}_{phase}_weights.pt", weights_only=True)


def test_fsdp2_sharded_checkpoint_resumes_exactly_saves_no_reference_and_exports(tiny_model_dir, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from lightning_safety.commands import export

    straight = run_ckpt_worker(tmp_path, tiny_model_dir, "straight", "sharded")
    run_ckpt_worker(tmp_path, tiny_model_dir, "first", "sharded")
    folder = tmp_path / "sharded_ckpt" / "epoch=0-step=4.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2  # one shard file per rank
    keys = list(FileSystemReader(folder).read_metadata().state_dict_metadata)
    weights = [key for key in keys if key.startswith("state_dict.")]
    assert weights and all(key.startswith("state_dict.policy.") for key in weights), "the reference must not be saved"
    resumed = run_ckpt_worker(tmp_path, tiny_model_dir, "resume", "sharded")
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=f"{name} differs after resume")

    # The sharded folder exports as a Hugging Face model holding the step-4 weights.
    exported = Path(export(str(folder), str(tmp_path / "export")))
    loaded = load_causal_lm(str(exported)).state_dict()
    first = torch.load(tmp_path / "sharded_first_weights.pt", weights_only=True)
    assert any((first[name] - straight[name]).abs().max() > 1e-4 for name in first), "steps 5-6 must move the weights"
    for name, value in first.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
