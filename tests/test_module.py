"""SafeFineTuning: reference strategies, skipping the reference, risk validation, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_safety.errors import IncompatibleReferenceError, LightningSafetyError, ModelLoadError, RiskError
from lightning_safety.schedules import ConstantBeta, LinearRiskSchedule, ThresholdRiskSchedule
import lightning_safety.reference as reference_lib
from lightning_safety.models import LoraSettings
from lightning_safety.reference import reference_logits
from lightning_safety.module import SafeFineTuning
from lightning_safety.tiny_model import build_tiny_llama


def make_batch(batch_size: int = 4, length: int = 12, prompt: int = 5, seed: int = 0, risk=None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 250, (batch_size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "prompt_length": torch.full((batch_size,), prompt),
    }
    if risk is not None:
        batch["risk"] = torch.tensor(risk, dtype=torch.float32)
    return batch


def build(model_folder, **kwargs) -> SafeFineTuning:
    module = SafeFineTuning(str(model_folder), **kwargs)
    module.configure_model()
    return module


def sequence_logprobs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)


def one_step(module: SafeFineTuning, batch: dict) -> None:
    optimizer = module.configure_optimizers()
    module.train()
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def policy_and_reference_logprobs(module: SafeFineTuning, batch: dict):
    with torch.no_grad():
        module.eval()
        policy = sequence_logprobs(module(batch["input_ids"], batch["attention_mask"]), batch)
        ref = reference_logits(module.reference_strategy, module.policy, module.reference, batch["input_ids"], batch["attention_mask"])
    return policy, sequence_logprobs(ref, batch)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lora": LoraSettings(r=4, dropout=0.0), "reference": "adapter_disabled"},
        {"reference": "model_copy"},
    ],
    ids=["adapter_disabled", "model_copy"],
)
def test_reference_equals_policy_before_the_first_step_and_differs_after(tiny_model_dir, kwargs):
    module = build(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **kwargs)
    batch = make_batch(risk=[0.0, 0.3, 0.7, 1.0])
    policy_before, ref_before = policy_and_reference_logprobs(module, batch)
    torch.testing.assert_close(policy_before, ref_before, rtol=0, atol=1e-6)
    one_step(module, batch)
    policy_after, ref_after = policy_and_reference_logprobs(module, batch)
    assert (policy_after - ref_after).abs().max() > 1e-4, "the policy did not move away from the reference"
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=1e-6)  # the reference is frozen


def test_adapter_copy_reference_is_the_trained_adapter_not_the_base(tiny_model_dir, tmp_path):
    lora_model = build(tiny_model_dir, lora=LoraSettings(r=4, dropout=0.0)).policy
    for name, parameter in lora_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.5)  # a trained, non-trivial adapter
    lora_model.save_pretrained(tmp_path / "adapter")
    module = build(tiny_model_dir, adapter=str(tmp_path / "adapter"), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    assert module.reference_strategy == "adapter_copy"
    batch = make_batch(risk=[1.0, 1.0, 1.0, 1.0])
    policy, ref = policy_and_reference_logprobs(module, batch)
    torch.testing.assert_close(policy, ref, rtol=0, atol=1e-6)
    with module.policy.disable_adapter(), torch.no_grad():
        base = sequence_logprobs(module.policy(input_ids=batch["input_ids"]).logits, batch)
    assert (base - ref).abs().max() > 1e-3, "adapter_copy must not fall back to the base model"
    one_step(module, batch)
    policy_after, ref_after = policy_and_reference_logprobs(module, batch)
    assert (policy_after - ref_after).abs().max() > 1e-4
    torch.testing.assert_close(ref_after, ref, rtol=0, atol=1e-6)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and not any(".reference." in n for n in trainable)


def test_adapter_disabled_keeps_one_copy_of_the_base_weights(tiny_model_dir):
    module = build(tiny_model_dir, lora=LoraSettings(r=4))
    assert module.reference_strategy == "adapter_disabled"
    assert module.reference is None
    base = build_tiny_llama()
    base_numel = sum(p.numel() for p in base.parameters())
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == base_numel  # exactly one copy, nothing duplicated
    assert len({p.data_ptr() for p in frozen}) == len(frozen)
    # The reference forward reads the very same storage as the policy's base layers.
    q_proj = module.policy.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q_proj.base_layer.register_forward_hook(lambda m, i, o: seen.append(m.weight.data_ptr()))
    reference_logits("adapter_disabled", module.policy, None, make_batch()["input_ids"], None)
    handle.remove()
    assert seen == [q_proj.base_layer.weight.data_ptr()]


def test_model_copy_reference_is_frozen_and_outside_the_optimizer(tiny_model_dir):
    module = build(tiny_model_dir, reference="model_copy")
    assert all(not p.requires_grad for p in module.reference.parameters())
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.policy.parameters()}
    assert not optimised & {id(p) for p in module.reference.parameters()}


def soft_cap_logits(model: nn.Module) -> None:
    """Make ``model`` post-process its logits, like Gemma-2's final logit soft-capping."""
    original = model.forward

    def soft_capped(*args, **kwargs):
        output = original(*args, **kwargs)
        output.logits = 5.0 * torch.tanh(output.logits / 5.0)
        return output

    model.forward = soft_capped


def count_reference_calls(monkeypatch) -> list[int]:
    rows: list[int] = []
    original = reference_lib.Reference.logits

    def counting(self, input_ids, attention_mask, logits_to_keep=0):
        rows.append(input_ids.shape[0])
        return original(self, input_ids, attention_mask, logits_to_keep)

    monkeypatch.setattr(reference_lib.Reference, "logits", counting)
    return rows


def test_prompt_positions_get_no_logits_and_the_loss_is_unchanged(tiny_model_dir):
    module = build(tiny_model_dir, schedule=LinearRiskSchedule())
    batch = make_batch(risk=[0.0, 0.3, 0.7, 1.0], prompt=5)
    assert module._logits_to_keep(batch["labels"]) == 12 - 4  # from one position before the response
    out, _, _ = module.compute_loss(batch, update_schedule=False)
    module._keep_logits_supported = False
    full, _, _ = module.compute_loss(batch, update_schedule=False)
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.kl_per_example, full.kl_per_example, rtol=1e-5, atol=1e-7)


def test_beta_zero_is_plain_sft_and_never_calls_the_reference(tiny_model_dir, monkeypatch):
    calls = count_reference_calls(monkeypatch)
    module = build(tiny_model_dir, schedule=ConstantBeta(0.0))
    batch = make_batch()  # no risk field: a constant beta does not need one
    out, _, beta = module.compute_loss(batch, update_schedule=True)
    assert calls == [] and torch.all(beta == 0)
    logits = module(batch["input_ids"], batch["attention_mask"])
    expected = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_reference_runs_only_on_rows_with_positive_beta(tiny_model_dir, monkeypatch):
    calls = count_reference_calls(monkeypatch)
    module = build(tiny_model_dir, schedule=ThresholdRiskSchedule(threshold=0.5, beta_low=0.0, beta_high=0.9))
    out, _, beta = module.compute_loss(make_batch(risk=[0.1, 0.9, 0.2, 0.3]), update_schedule=True)
    assert calls == [1]
    assert out.kl_per_example[[0, 2, 3]].abs().max() == 0
    module.compute_loss(make_batch(risk=[0.1, 0.2, 0.2, 0.3]), update_schedule=True)
    assert calls == [1], "no risky row: no reference forward at all"


def test_kl_scale_scales_the_kl_and_zero_never_calls_the_reference(tiny_model_dir, monkeypatch):
    calls = count_reference_calls(monkeypatch)
    batch = make_batch(risk=[0.0, 0.3, 0.7, 1.0])
    torch.manual_seed(0)
    paper = build(tiny_model_dir, schedule=LinearRiskSchedule(), normalization="example")
    one_step(paper, batch)  # the policy moves away from the reference: the KL is no longer 0
    paper.eval()  # no dropout: the losses below see the same policy
    out, _, beta = paper.compute_loss(batch, update_schedule=False)
    assert float(out.kl) > 0
    for scale in (0.25, 0.0):
        paper.kl_scale = scale
        scaled, _, _ = paper.compute_loss(batch, update_schedule=False)
        expected = ((1 - beta) * out.nll_per_example + scale * beta * out.kl_per_example).mean()
        torch.testing.assert_close(scaled.loss, expected, rtol=1e-5, atol=1e-6)
    before = len(calls)
    paper.compute_loss(batch, update_schedule=False)
    assert len(calls) == before, "kl_scale 0: no reference forward"
    with pytest.raises(LightningSafetyError, match="kl_scale"):
        build(tiny_model_dir, kl_scale=-1.0)


@pytest.mark.parametrize("risk", [[0.1, float("nan"), 0.2, 0.3], [0.1, 1.5, 0.2, 0.3], [0.1, -0.2, 0.2, 0.3]])
def test_bad_risk_fails_closed_with_one_line(tiny_model_dir, risk):
    module = build(tiny_model_dir)
    with pytest.raises(RiskError) as error:
        module.compute_loss(make_batch(risk=risk), update_schedule=True)
    assert "\n" not in str(error.value) and "[0, 1]" in str(error.value)


def test_missing_risk_field_is_an_error_not_zero_risk(tiny_model_dir):
    module = build(tiny_model_dir)
    with pytest.raises(RiskError, match="no 'risk' field"):
        module.compute_loss(make_batch(), update_schedule=True)


def test_beta_min_above_beta_max_is_rejected():
    with pytest.raises(RiskError, match="beta_min"):
        LinearRiskSchedule(beta_min=0.9, beta_max=0.1)


def test_unknown_model_is_a_one_line_error(tmp_path):
    for name in [str(tmp_path / "missing-folder"), "./not/a/model", "not a model id!"]:
        with pytest.raises(ModelLoadError) as error:
            build(name)
        assert "\n" not in str(error.value) and "not found" in str(error.value)


def test_lora_targets_missing_from_the_model(tiny_model_dir):
    with pytest.raises(ModelLoadError) as error:
        build(tiny_model_dir, lora=LoraSettings(target_modules=["c_attn"]))
    message = str(error.value)
    assert "c_attn" in message and "q_proj" in message and "\n" not in message


def test_reference_with_a_different_vocabulary_is_refused(tiny_model_dir, tmp_path):
    other = build_tiny_llama(vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleReferenceError) as error:
        build(tiny_model_dir, reference="separate", reference_model=str(tmp_path / "other"))
    assert "vocabulary" in str(error.value) and "\n" not in str(error.value)


def test_separate_reference_with_the_same_model_matches_the_policy(tiny_model_dir):
    module = build(tiny_model_dir, reference_model=str(tiny_model_dir))
    assert module.reference_strategy == "separate"
    policy, ref = policy_and_reference_logprobs(module, make_batch())
    torch.testing.assert_close(policy, ref, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir):
    batch = make_batch(risk=[0.0, 0.4, 0.8, 1.0])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        module = build(tiny_model_dir, lora=LoraSettings(r=4, dropout=0.0), gradient_checkpointing=checkpointing)
        assert module.policy.is_gradient_checkpointing == checkpointing
        out, _, _ = module.compute_loss(batch, update_schedule=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and any(g.abs().sum() > 0 for g in grads_plain.values())
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [{"lora": LoraSettings(r=4, dropout=0.0)}, {"reference": "model_copy"}],
    ids=["adapter_disabled", "model_copy"],
)
def test_reference_logits_are_projected_per_chunk_with_the_same_result(tiny_model_dir, kwargs):
    module = build(tiny_model_dir, chunk_size=8, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **kwargs)
    batch = make_batch(risk=[0.0, 0.4, 0.8, 1.0])
    one_step(module, batch)  # so that policy and reference differ
    out, _, _ = module.compute_loss(batch, update_schedule=False)
    assert module.frozen_reference.projection(batch["input_ids"]) is not None, "a plain Llama head should be projected late"
    module.frozen_reference._projection = None  # the materialised [B, T, V] reference logits
    full, _, _ = module.compute_loss(batch, update_schedule=False)
    assert full.kl > 0
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl_per_example, full.kl_per_example, rtol=1e-4, atol=1e-6)


def test_a_reference_that_post_processes_its_logits_is_not_projected_late(tiny_model_dir):
    module = build(tiny_model_dir, reference="model_copy")
    soft_cap_logits(module.reference)
    out, _, _ = module.compute_loss(make_batch(risk=[1.0, 1.0, 1.0, 1.0]), update_schedule=False)
    assert module.frozen_reference.projection(make_batch()["input_ids"]) is None
    assert torch.isfinite(out.loss)


def test_a_model_object_is_registered_once(tiny_model_dir):
    model = build_tiny_llama()
    module = SafeFineTuning(model, reference="model_copy")
    assert list(module.state_dict()) == []  # nothing registered before configure_model
    module.configure_model()
    assert module.policy is model
    keys = list(module.state_dict())
    assert keys and all(key.startswith(("policy.", "reference.")) for key in keys)
    assert sum(key.startswith("policy.") for key in keys) == len(model.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [{"lora": LoraSettings(r=4, dropout=0.0)}, {"reference": "model_copy"}],
    ids=["lora", "full_fine_tuning"],
)
def test_fused_output_layer_gives_the_same_loss_and_gradients(tiny_model_dir, kwargs):
    batch = make_batch(risk=[0.0, 0.4, 0.8, 1.0])
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        module = build(tiny_model_dir, chunk_size=8, fused_output_layer=fused, **kwargs)
        module.train()
        out, _, _ = module.compute_loss(batch, update_schedule=False)
        out.loss.backward()
        assert (module._fused_parts(batch["input_ids"]) is not None) == fused
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
        results[fused] = (out, grads)
    (fused_out, fused_grads), (plain_out, plain_grads) = results[True], results[False]
    torch.testing.assert_close(fused_out.loss, plain_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_out.kl_per_example, plain_out.kl_per_example, rtol=1e-4, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_the_output_layer_is_fused_by_default_only_with_chunks(tiny_model_dir):
    assert build(tiny_model_dir, chunk_size=8).fused_output_layer
    assert not build(tiny_model_dir).fused_output_layer


def test_a_policy_that_post_processes_its_logits_is_not_fused(tiny_model_dir):
    module = build(tiny_model_dir, chunk_size=8, reference="model_copy")
    soft_cap_logits(module.policy)
    batch = make_batch(risk=[1.0, 0.0, 1.0, 0.0])
    out, _, _ = module.compute_loss(batch, update_schedule=False)
    assert module._fused_parts(batch["input_ids"]) is None
    assert torch.isfinite(out.loss)
