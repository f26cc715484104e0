"""Activation probe: layer taps, pooling, training, artifact, sweep, and a real-model check."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import importlib.util
import inspect
import json
import pickle

import pytest
import torch
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from lightning_safety.commands import run_command
from lightning_safety.errors import CalibrationError, ProbeError, ProbeMismatchError
from lightning_safety.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer
from lightning_safety.risk import probe as probe_module
from lightning_safety.risk.hooks import CaptureComplete, LayerTaps, find_decoder_layers
from lightning_safety.risk.metrics_core import auroc, average_ranks, recall_at_fpr, threshold_at_fpr
from lightning_safety.risk.probe import (
    TRAINING_DEFAULTS,
    ActivationProbe,
    ProbeClassifier,
    ProbeTrainingSettings,
    _train_step,
    artifact,
    extract_features,
    featurize_prompts,
    fit_probe,
    model_fingerprint,
    plot_sweep,
    pool_hidden,
    prompt_token_mask,
    render_prompt,
    sweep,
    sweep_table,
    train_probe,
)
from lightning_safety.tiny_model import tiny_model_folder

HARMFUL_WORDS = ["poison", "weapon", "attack", "steal", "hack"]
TOPICS = ["the garden", "my neighbour", "a bank", "the school", "a website", "the city", "my friend", "a shop"]


@pytest.fixture()
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _batch(tokenizer, prompts, replies=None):
    """Right-padded ids [B, T], mask [B, T], prompt_length [B]; an optional reply follows each prompt."""
    rows, lengths = [], []
    for i, prompt in enumerate(prompts):
        ids = render_prompt(tokenizer, prompt)
        lengths.append(len(ids))
        rows.append(ids + (tokenizer.encode(replies[i]) if replies else []))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
    return input_ids, mask, torch.tensor(lengths)


def _marker_prompts(n: int) -> tuple[list[str], list[str]]:
    harmful = [f"how do I {HARMFUL_WORDS[i % 5]} {TOPICS[i % 8]} #{i}" for i in range(n)]
    benign = [f"how do I visit {TOPICS[i % 8]} #{i}" for i in range(n)]
    return harmful, benign


# --------------------------------------------------------------------------------------------- hooks


def test_decoder_layers_are_found_by_identity_also_under_lora(tiny):
    model, _ = tiny
    layers = find_decoder_layers(model)
    assert [id(layer) for layer in layers] == [id(layer) for layer in model.model.layers]
    wrapped = apply_lora(model, LoraSettings(r=2))
    assert [id(layer) for layer in find_decoder_layers(wrapped)] == [id(layer) for layer in layers]
    with pytest.raises(ProbeError) as error:
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    assert "\n" not in str(error.value) and "no decoder layers" in str(error.value)


def test_taps_capture_each_layers_output(tiny):
    model, tokenizer = tiny
    input_ids, mask, _ = _batch(tokenizer, ["hello", "a longer prompt here"])
    with LayerTaps.for_model(model, [0, -1]) as taps:
        assert taps.keys == [0, 1]
        with taps.capture() as store:
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    assert store.calls == {0: 1, 1: 1}
    torch.testing.assert_close(store[0], out.hidden_states[1])
    # HF's last entry comes after the final norm: the last layer's own output, normed, is that entry.
    torch.testing.assert_close(model.model.norm(store[1]), out.hidden_states[-1])
    assert not store[0].requires_grad


def test_taps_record_only_while_armed_and_only_the_first_call(tiny):
    model, tokenizer = tiny
    first, mask, _ = _batch(tokenizer, ["first prompt"])
    second = torch.flip(first, dims=[1])
    with LayerTaps.for_model(model, [0]) as taps:
        model(input_ids=first, attention_mask=mask)  # not armed: nothing kept anywhere
        with taps.capture() as store:
            expected = model(input_ids=first, attention_mask=mask, output_hidden_states=True).hidden_states[1]
            model(input_ids=second, attention_mask=mask)
        model(input_ids=second, attention_mask=mask)
    assert store.calls == {0: 2}
    torch.testing.assert_close(store[0], expected)


def test_capture_can_end_the_forward_once_the_wanted_layers_ran(tiny):
    model, tokenizer = tiny
    ids, mask, lengths = _batch(tokenizer, ["stop early"])
    with LayerTaps.for_model(model, [0, 1]) as taps:
        with taps.capture(stop_after=[0]) as store, pytest.raises(CaptureComplete):
            model(input_ids=ids, attention_mask=mask)
        assert list(store) == [0] and store.calls == {0: 1}  # layer 1 never ran
        shared = extract_features(model, ids, mask, lengths, layers=[-2], pooling="last", taps=taps)
    alone = extract_features(model, ids, mask, lengths, layers=[0], pooling="last")
    torch.testing.assert_close(shared, alone)
    with LayerTaps.for_model(model, [1]) as taps, pytest.raises(ProbeError, match="do not tap layers \\[0\\]"):
        extract_features(model, ids, mask, lengths, layers=[0], pooling="last", taps=taps)


def test_hooks_are_gone_after_remove_and_context_exit(tiny):
    model, _ = tiny
    layers = find_decoder_layers(model)
    before = [dict(layer._forward_hooks) for layer in layers]
    taps = LayerTaps.for_model(model, [0, 1])
    ours = [handle.id for handle in taps._handles]
    assert all(h in layers[i]._forward_hooks for i, h in enumerate(ours))
    taps.remove()
    taps.remove()  # idempotent
    assert [dict(layer._forward_hooks) for layer in layers] == before
    assert not taps.active
    with pytest.raises(ProbeError, match="removed"):
        with taps.capture():
            pass
    with LayerTaps.for_model(model, [1]) as scoped:
        assert scoped.active
    assert [dict(layer._forward_hooks) for layer in layers] == before


def test_taps_survive_lora_and_read_the_base_weights(tiny):
    model, tokenizer = tiny
    input_ids, mask, lengths = _batch(tokenizer, ["tell me a story", "hi"], replies=["Once upon", "Hello!"])
    base = extract_features(model, input_ids, mask, lengths, layers=[0, 1], pooling="mean")
    wrapped = apply_lora(model, LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():  # make the adapter matter (B is zero-initialised)
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    taps = LayerTaps.for_model(wrapped, [0, 1])  # resolved on the wrapped model
    reference = extract_features(wrapped, input_ids, mask, lengths, layers=[0, 1], pooling="mean", taps=taps)
    adapted = extract_features(wrapped, input_ids, mask, lengths, layers=[0, 1], pooling="mean", taps=taps, use_adapter=True)
    taps.remove()
    torch.testing.assert_close(reference, base)
    assert not torch.allclose(adapted, base)


def test_taps_under_gradient_checkpointing_record_each_layer_once(tiny):
    model, tokenizer = tiny
    input_ids, mask, _ = _batch(tokenizer, ["checkpoint me", "and me too"])
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with LayerTaps.for_model(model, [0, 1]) as taps, taps.capture() as store:
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
        out.loss.backward()
    assert store.calls == {0: 1, 1: 1}
    torch.testing.assert_close(store[0], expected[1])
    torch.testing.assert_close(model.model.norm(store[1]).detach(), expected[2])


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_recomputation_in_backward_is_ignored(reentrant):
    """A checkpoint that wraps the tapped module itself calls it again in backward: keep the first."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=reentrant)

    torch.manual_seed(0)
    outer = Outer()
    x = torch.randn(3, 4, requires_grad=True)
    with LayerTaps([outer.block]) as taps, taps.capture() as store:
        with set_checkpoint_early_stop(False):  # recompute the whole module, hooks included
            outer(x).sum().backward()
        with torch.no_grad():
            outer.block.weight.add_(1.0)  # a later call would now differ
        outer(x)
    assert store.calls[0] == 3  # forward, recomputation, second forward
    torch.testing.assert_close(store[0], (x @ (outer.block.weight - 1.0).T + outer.block.bias).detach())


# --------------------------------------------------------------------------------------------- pooling


def test_pooling_on_hand_built_states_ignores_padding_and_the_reply():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)  # [B=2, P=4, H=2]
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    lengths = torch.tensor([2, 4])  # row 0: position 2 is reply, 3 padding
    prompt = prompt_token_mask(attention, lengths, 4)
    assert prompt.tolist() == [[True, True, False, False], [True, True, True, True]]
    last = pool_hidden(hidden, prompt, lengths, "last")
    mean = pool_hidden(hidden, prompt, lengths, "mean")
    torch.testing.assert_close(last, torch.tensor([[2.0, 3.0], [14.0, 15.0]]))
    torch.testing.assert_close(mean, torch.tensor([[1.0, 2.0], [11.0, 12.0]]))


def test_left_padding_and_bad_prompt_lengths_are_rejected():
    with pytest.raises(ProbeError, match="pad batches on the right"):
        prompt_token_mask(torch.tensor([[0, 1, 1]]), torch.tensor([2]), 3)
    with pytest.raises(ProbeError, match="prompt_length"):
        prompt_token_mask(torch.tensor([[1, 1, 1]]), torch.tensor([0]), 3)


def test_features_come_from_prompt_tokens_only_and_batching_does_not_matter(tiny):
    model, tokenizer = tiny
    prompts = ["short", "a much longer prompt than the other one"]
    ids, mask, lengths = _batch(tokenizer, prompts, replies=["reply one that is long", "r"])
    for pooling, width in [("last", 128), ("mean", 128), ("mean_all_layers", 64)]:
        batched = extract_features(model, ids, mask, lengths, layers=[0, -1], pooling=pooling)
        assert batched.shape == (2, width) and batched.dtype == torch.float32
        for row, prompt in enumerate(prompts):
            alone_ids, alone_mask, alone_len = _batch(tokenizer, [prompt])
            alone = extract_features(model, alone_ids, alone_mask, alone_len, layers=[0, 1], pooling=pooling)
            torch.testing.assert_close(batched[row], alone[0], rtol=1e-4, atol=1e-5)
    featurized = featurize_prompts(model, tokenizer, prompts[::-1] * 2, layers=[1], pooling="last", batch_size=3)
    direct = extract_features(model, ids, mask, lengths, layers=[1], pooling="last")
    torch.testing.assert_close(featurized, direct[[1, 0, 1, 0]], rtol=1e-4, atol=1e-5)
    with pytest.raises(ProbeError, match="out of range"):
        extract_features(model, ids, mask, lengths, layers=[2], pooling="mean")
    with pytest.raises(ProbeError, match="unknown pooling"):
        extract_features(model, ids, mask, lengths, layers=[0], pooling="max")


def test_extract_features_leaves_no_hooks_and_restores_train_mode(tiny):
    model, tokenizer = tiny
    model.train()
    ids, mask, lengths = _batch(tokenizer, ["x"])
    extract_features(model, ids, mask, lengths, layers=[0], pooling="mean")
    assert model.training and all(not layer._forward_hooks for layer in find_decoder_layers(model))


# --------------------------------------------------------------------------------------------- training


def _separable(n: int = 200, features: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2).float()
    x = torch.randn(n, features, generator=generator)
    x[:, 0] += 4.0 * (2 * labels - 1)  # margin along one direction
    return x * 3 + 5, labels  # off-centre and scaled: the standardiser must handle it


def test_logistic_probe_separates_and_is_deterministic():
    x, y = _separable()
    first, metrics = train_probe(x, y, seed=3)
    second, _ = train_probe(x, y, seed=3)
    assert metrics["val_auroc"] > 0.99 and metrics["train_auroc"] > 0.99 and metrics["val_accuracy"] > 0.95
    assert (metrics["n_train"], metrics["n_val"]) == (160, 40)
    assert metrics["train_loss_final"] < metrics["train_loss_initial"]
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    probs = first.predict_proba(x)
    assert probs.shape == (200,) and bool(((probs >= 0) & (probs <= 1)).all())


def test_mlp_probe_learns_a_nonlinear_boundary_deterministically():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(240, 2, generator=generator)
    y = (x[:, 0] * x[:, 1] > 0).float()  # XOR of signs: no linear probe can do this
    _, linear = train_probe(x, y, kind="logistic", seed=0)
    mlp, metrics = train_probe(x, y, kind="mlp", hidden=32, lr=3e-2, epochs=300, seed=0, batch_size=64)
    again, _ = train_probe(x, y, kind="mlp", hidden=32, lr=3e-2, epochs=300, seed=0, batch_size=64)
    assert metrics["val_auroc"] > 0.95 and linear["val_auroc"] < 0.75
    assert metrics["train_loss_final"] < 0.5 * metrics["train_loss_initial"]
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_each_step_uses_a_fresh_gradient():
    """Regression for the authors' MLP, which never zeroed gradients: .grad must be this step's alone."""
    x, y = _separable(n=32)
    torch.manual_seed(0)
    classifier = ProbeClassifier(8, kind="mlp", hidden=16, dropout=0.0)
    classifier.fit_standardizer(x)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    _train_step(classifier, optimizer, loss_fn, x, y)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    fresh = ProbeClassifier(8, kind="mlp", hidden=16, dropout=0.0)
    fresh.load_state_dict(classifier.state_dict())
    loss_fn(fresh(x), y).backward()
    _train_step(classifier, optimizer, loss_fn, x, y)
    for name, p in classifier.named_parameters():
        expected = dict(fresh.named_parameters())[name].grad
        torch.testing.assert_close(p.grad, expected)
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * expected)


def test_train_probe_rejects_unusable_data():
    x, y = _separable(n=20)
    with pytest.raises(ProbeError, match="at least 2 harmful"):
        train_probe(x, torch.zeros(20))
    with pytest.raises(ProbeError, match="one label per row"):
        train_probe(x, y[:5])
    with pytest.raises(ProbeError, match="0 \\(benign\\) or 1"):
        train_probe(x, y * 2)


# --------------------------------------------------------------------------------------------- metrics


def test_auroc_and_recall_at_fpr_on_hand_computed_examples():
    assert average_ranks(torch.tensor([0.3, 0.1, 0.3, 0.2])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # Ties count half: pairs (h, b): (0.5,0.5)=0.5, (0.5,0.2)=1, (0.9,0.5)=1, (0.9,0.2)=1 -> 3.5/4.
    assert auroc(torch.tensor([0.5, 0.9, 0.5, 0.2]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.875)
    assert auroc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 0, 1])) == pytest.approx(0.5)
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([True, False])) == 0.0
    benign, harmful = [0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6, 0.2]
    scores = torch.tensor(benign + harmful)
    labels = torch.tensor([0] * 4 + [1] * 4)
    # At most 1 of 4 benign may score >= t: the smallest such observed score is 0.35 -> 3 of 4 harmful.
    assert threshold_at_fpr(scores, labels, 0.25) == pytest.approx(0.35)
    assert recall_at_fpr(scores, labels, 0.25) == pytest.approx(0.75)
    # No benign above t: t = 0.5 (just above the top benign 0.4) -> 2 of 4.
    assert recall_at_fpr(scores, labels, 0.0) == pytest.approx(0.5)
    assert recall_at_fpr(scores, labels, 1.0) == pytest.approx(1.0)
    tied = torch.tensor([0.5, 0.5, 0.5, 0.9])  # a benign tie at the top score cannot be split
    assert recall_at_fpr(tied, torch.tensor([0, 1, 1, 0]), 0.4) == 0.0
    with pytest.raises(ProbeError, match="both harmful"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


# --------------------------------------------------------------------------------------------- artifact


def _toy_probe(model, tokenizer, tmp_path=None) -> ActivationProbe:
    harmful, benign = _marker_prompts(12)
    return fit_probe(
        model, tokenizer, harmful, benign, layers=[-1], pooling="mean", epochs=50,
        calibration_fraction=0.0, model_name="tiny-random-llama",
    )


def test_fingerprint_tracks_the_base_weights_not_the_adapter_or_the_dtype(tiny, tiny_model_dir):
    model, _ = tiny
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 64
    assert model_fingerprint(load_causal_lm(str(tiny_model_dir))) == fingerprint
    assert model_fingerprint(load_causal_lm(str(tiny_model_dir), dtype="bf16")) == fingerprint
    wrapped = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings(r=2))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.add_(1.0)
    assert model_fingerprint(wrapped) == fingerprint
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)  # a "fine-tuned" base
    assert model_fingerprint(model) != fingerprint


def test_probe_round_trip_and_refusal_of_another_model(tiny, tmp_path):
    model, tokenizer = tiny
    probe = _toy_probe(model, tokenizer)
    folder = probe.save(tmp_path / "probe")
    assert sorted(p.name for p in folder.iterdir()) == ["probe.json", "probe.safetensors"]
    meta = json.loads((folder / "probe.json").read_text())
    assert meta["layers"] == [1] and meta["pooling"] == "mean" and meta["fingerprint"] == model_fingerprint(model)
    loaded = ActivationProbe.load(folder, model=model)
    ids, mask, lengths = _batch(tokenizer, ["how do I poison a bank", "how do I visit a shop"])
    torch.testing.assert_close(loaded.score(model, ids, mask, lengths), probe.score(model, ids, mask, lengths), rtol=0, atol=0)
    assert loaded.threshold == probe.threshold and loaded.metrics == json.loads(json.dumps(probe.metrics))

    other = load_causal_lm(str(tiny_model_folder(seed=1)))
    with pytest.raises(ProbeMismatchError) as error:
        ActivationProbe.load(folder, model=other)
    message = str(error.value)
    assert "\n" not in message
    assert f"probe at {folder} was trained on model 'tiny-random-llama' (fingerprint {probe.fingerprint[:12]}" in message
    assert model_fingerprint(other)[:12] in message and "lightning-safety probe fit" in message

    with pytest.raises(ProbeError, match="already exists"):
        probe.save(folder)
    probe.threshold = 0.7
    probe.save(folder, overwrite=True)
    assert ActivationProbe.load(folder).threshold == 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]
    with pytest.raises(ProbeError, match="no probe at"):
        ActivationProbe.load(tmp_path / "missing")


def test_a_failed_save_leaves_no_folder(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    probe = _toy_probe(model, tokenizer)

    def broken(path, metadata):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "_write_metadata", broken)
    with pytest.raises(OSError, match="disk full"):
        probe.save(tmp_path / "probe")
    assert list(tmp_path.iterdir()) == []


def test_fit_probe_end_to_end_with_calibration(tiny, tmp_path):
    model, tokenizer = tiny
    harmful, benign = _marker_prompts(40)
    probe = fit_probe(
        model, tokenizer, harmful, benign, layers=[0, 1], pooling="mean_all_layers", epochs=100,
        calibration_fraction=0.2, alpha=0.2, delta=0.2, model_name="tiny",
    )
    assert probe.layers == [0, 1] and probe.hidden_size == 64 and probe.num_layers == 2
    assert probe.metrics["n_train"] + probe.metrics["n_val"] == 64  # 80 minus 8 + 8 held out
    assert probe.calibration is not None and probe.calibration["n"] == 8
    assert probe.threshold == probe.calibration["threshold"]
    assert "at least 80% of harmful prompts" in probe.calibration["statement"]
    folder = probe.save(tmp_path / "artifact")
    again = ActivationProbe.load(folder, model=model)
    assert again.calibration == probe.calibration
    scores = again.score_prompts(model, tokenizer, harmful[:3] + benign[:3])
    assert scores.shape == (6,) and bool(((scores >= 0) & (scores <= 1)).all())
    with pytest.raises(CalibrationError, match="set calibration_fraction=0"):
        fit_probe(model, tokenizer, harmful[:10], benign[:10], layers=[0], calibration_fraction=0.2)


def test_sweep_table_and_plot(tiny, tmp_path):
    model, tokenizer = tiny
    harmful, benign = _marker_prompts(20)
    ood = {"rephrased": ([f"please {w} it" for w in HARMFUL_WORDS], [f"please {t}" for t in TOPICS[:5]])}
    rows = sweep(model, tokenizer, harmful, benign, layers="all", ood=ood, epochs=40)
    assert [(r["layer"], r["pooling"]) for r in rows] == [
        (0, "last"), (0, "mean"), (1, "last"), (1, "mean"), (None, "mean_all_layers")
    ]
    for row in rows:
        assert 0.0 <= row["val_auroc"] <= 1.0 and 0.0 <= row["recall_at_5pct_fpr"] <= 1.0
        assert set(row["ood_auroc"]) == {"rephrased"}
    table = sweep_table(rows)
    assert table.splitlines()[0].startswith("| layer | pooling | val AUROC") and "AUROC rephrased" in table
    assert len(table.splitlines()) == 2 + len(rows)
    png = plot_sweep(rows, tmp_path / "plots" / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- one place for defaults, old paths

# Every public name of the single-file lightning_safety/risk/probe.py, before it became a package.
OLD_PUBLIC_NAMES = [
    "METADATA_FILE", "POOLINGS", "PROBE_FORMAT", "PROBE_VERSION", "WEIGHTS_FILE", "ActivationProbe",
    "ProbeClassifier", "ProbeKind", "combine_layers", "extract_features", "featurize_pooled", "featurize_prompts",
    "fit_probe", "model_fingerprint", "model_structure", "plot_sweep", "pool_hidden", "pooled_prompt_states",
    "prompt_token_mask", "ranking_scores", "render_prompt", "stratified_split", "sweep", "sweep_table", "train_probe",
]


def _cli_defaults(capsys, *args: str) -> dict:
    """The options of a command as the CLI parses them when only the required ones are given."""
    with pytest.raises(SystemExit) as exit_info:
        run_command([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_training_defaults_are_set_once_in_probe_training_settings(capsys):
    defaults = dataclasses.asdict(ProbeTrainingSettings())
    assert len(defaults) == 9 and TRAINING_DEFAULTS == ProbeTrainingSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRAINING_DEFAULTS.epochs = 1  # type: ignore[misc]
    for function, names in [
        (fit_probe, defaults), (train_probe, defaults), (ProbeClassifier, ("kind", "hidden", "dropout")),
        (sweep, ("weight_decay", "lr", "epochs", "val_fraction", "seed")),
    ]:
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in names} == {name: defaults[name] for name in names}, function
    fit_options = _cli_defaults(capsys, "probe", "fit", "--model", "m", "--output", "o")
    sweep_options = _cli_defaults(
        capsys, "probe", "sweep", "--model", "m", "--output", "o", "--harmful.path", "h", "--benign.path", "b"
    )
    for options, names in [
        (fit_options, ("kind", "weight_decay", "epochs", "val_fraction", "seed")),
        (sweep_options, ("weight_decay", "val_fraction", "seed")),
    ]:
        assert set(options) & set(defaults) == set(names)
        assert {name: options[name] for name in names} == {name: defaults[name] for name in names}


def test_the_single_module_import_paths_still_work():
    import lightning_safety
    from lightning_safety import risk
    from lightning_safety.risk.probe import fitting, layer_sweep

    for name in OLD_PUBLIC_NAMES:
        assert name in probe_module.__all__ and getattr(probe_module, name) is not None, name
    assert lightning_safety.ActivationProbe is artifact.ActivationProbe is risk.ActivationProbe
    assert lightning_safety.fit_probe is fitting.fit_probe is risk.fit_probe
    assert risk.sweep is layer_sweep.sweep is probe_module.sweep
    # Class paths as YAML configs and checkpoints spell them, and as a pickle stores them.
    for path, expected in [
        ("lightning_safety.risk.probe.ActivationProbe", ActivationProbe),
        ("lightning_safety.risk.probe.ProbeClassifier", ProbeClassifier),
    ]:
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name) is expected
        assert pickle.loads(f"c{module}\n{name}\n.".encode()) is expected


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package to convert SmolLM2")
def test_smollm2_probe_separates_advbench_from_alpaca(shared_data):
    advbench = shared_data / "advbench_harmful_behaviors.csv"
    alpaca = shared_data / "alpaca_instructions.jsonl"
    if not advbench.exists() or not alpaca.exists():
        pytest.skip("AdvBench or Alpaca file missing from the shared data folder")
    with advbench.open(newline="") as handle:
        harmful = [row["goal"] for row in csv.DictReader(handle)][:120]
    benign = []
    with alpaca.open() as handle:
        for line in handle:
            instruction = json.loads(line)["instruction"]
            if len(instruction) < 200:
                benign.append(instruction)
            if len(benign) == 120:
                break
    model = load_causal_lm("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    middle = model.config.num_hidden_layers // 2
    features = featurize_prompts(model, tokenizer, harmful + benign, layers=[middle], pooling="mean", batch_size=16)
    labels = torch.cat([torch.ones(len(harmful)), torch.zeros(len(benign))])
    _, metrics = train_probe(features, labels, kind="logistic", val_fraction=0.3, seed=0)
    print(f"SmolLM2 layer {middle} mean pooling: held-out AUROC {metrics['val_auroc']:.4f} (n_val={metrics['n_val']})")
    assert metrics["val_auroc"] >= 0.95
