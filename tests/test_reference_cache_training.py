"""SafeFineTuning with a reference cache: exact at k = V, no reference forward, fails closed, resumes."""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import TINY_DATA, check_resume, run

import lightning_safety.reference as reference_lib
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.errors import DataError, LightningSafetyError
from lightning_safety.models import LoraSettings
from lightning_safety.module import SafeFineTuning
from lightning_safety.reference_cache import ReferenceCache, ReferenceCacheError
from lightning_safety.schedules import LinearRiskSchedule
from lightning_safety.tiny_model import build_tiny_llama

VOCAB = 259  # the tiny model's


def batches(count: int = 2, rows: int = 3, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    out = []
    for b in range(count):
        ids = torch.randint(3, 250, (rows, length), generator=generator)
        labels = ids.clone()
        labels[:, :5] = -100
        labels[0, -2:] = -100  # padding at the end of one row
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "risk": torch.tensor([0.0, 0.6, 1.0][:rows]), "id": [f"ex{b}-{r}" for r in range(rows)]})
    return out


def build(model_dir, **kwargs) -> SafeFineTuning:
    module = SafeFineTuning(str(model_dir), schedule=LinearRiskSchedule(0.0, 0.9), **kwargs)
    module.configure_model()
    return module


def losses(module: SafeFineTuning, data: list[dict]) -> list[torch.Tensor]:
    return [module.compute_loss(batch, update_schedule=False)[0] for batch in data]


@pytest.mark.parametrize(
    "kwargs", [{"reference": "model_copy"}, {"lora": LoraSettings(r=4, dropout=0.0)}], ids=["model_copy", "adapter_disabled"]
)
def test_a_full_vocabulary_cache_reproduces_the_exact_loss_without_a_reference_forward(tiny_model_dir, tmp_path, kwargs, monkeypatch):
    data = batches()
    exact = build(tiny_model_dir, chunk_size=7, **kwargs)
    cache = exact.precompute_reference(data, str(tmp_path / "cache"), top_k=VOCAB)
    assert cache.num_examples == 6 and cache.num_tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    cached = build(tiny_model_dir, chunk_size=7, reference_cache=str(tmp_path / "cache"), **kwargs)
    with torch.no_grad():  # move the policy off the reference (the same way in both), so that the KL is not 0
        generator = torch.Generator().manual_seed(1)
        for parameter in exact.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    cached.policy.load_state_dict(exact.policy.state_dict())
    calls = []
    original = reference_lib.Reference.logits
    monkeypatch.setattr(reference_lib.Reference, "logits", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for got, want in zip(losses(cached, data), losses(exact, data)):
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.kl_per_example, want.kl_per_example, rtol=1e-4, atol=1e-6)
        assert float(want.kl) > 0
    assert len(calls) == len(data)  # the exact module's forwards only


def test_a_top_k_cache_is_a_lower_bound_that_tightens_with_k(tiny_model_dir, tmp_path):
    """The tiny random model's distributions are nearly flat (the hard case): the top-k KL must stay
    below the exact one and close in as k grows. Real models: benchmarks/reference_cache.py."""
    data = batches()
    exact = build(tiny_model_dir, reference="model_copy", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    optimizer = exact.configure_optimizers()
    exact.compute_loss(data[0], update_schedule=False)[0].loss.backward()
    optimizer.step()  # the policy moves away from the reference (the reference stays as it was)
    want = torch.cat([out.kl_per_example for out in losses(exact, data)])
    gaps = []
    for k in (16, 64, 200):
        exact.precompute_reference(data, str(tmp_path / f"k{k}"), top_k=k)
        cached = build(tiny_model_dir, reference="model_copy", reference_cache=str(tmp_path / f"k{k}"))
        cached.policy.load_state_dict(exact.policy.state_dict())
        got = torch.cat([out.kl_per_example for out in losses(cached, data)])
        assert bool((got <= want + 1e-6).all()) and bool((got[want > 0] > 0).all())
        gaps.append(float((want - got).sum()))
    assert gaps[0] > gaps[1] > gaps[2] > 0


def test_a_cache_of_another_reference_or_data_is_refused(tiny_model_dir, tmp_path):
    data = batches()
    build(tiny_model_dir, reference="model_copy").precompute_reference(data, str(tmp_path / "cache"), top_k=8)
    other = SafeFineTuning(build_tiny_llama(seed=1), reference="model_copy", reference_cache=str(tmp_path / "cache"))
    other.configure_model()  # builds without the cache: exporting a cached run's checkpoint needs none
    with pytest.raises(ReferenceCacheError, match="was built for reference"):
        other.compute_loss(data[0], update_schedule=False)  # other weights: another reference
    cached = build(tiny_model_dir, reference="model_copy", reference_cache=str(tmp_path / "cache"))
    unknown = dict(data[0], id=["ex0-0", "new-1", "ex0-2"])  # row 0 has beta 0 and is not looked up
    with pytest.raises(ReferenceCacheError, match="precompute-reference"):
        cached.compute_loss(unknown, update_schedule=False)
    longer = dict(data[0], labels=data[0]["labels"].clone())
    longer["labels"][2, 4] = 7  # one more response token than cached
    with pytest.raises(ReferenceCacheError, match="precompute-reference"):
        cached.compute_loss(longer, update_schedule=False)
    with pytest.raises(DataError, match="id"):
        cached.compute_loss({k: v for k, v in data[0].items() if k != "id"}, update_schedule=False)


def test_a_cache_switched_on_and_off_during_training(tiny_model_dir, tmp_path, monkeypatch):
    data = batches()
    module = build(tiny_model_dir, reference="model_copy")
    cache = module.precompute_reference(data, str(tmp_path / "cache"), top_k=VOCAB)
    exact = losses(module, data)
    calls = []
    original = reference_lib.Reference.logits
    monkeypatch.setattr(reference_lib.Reference, "logits", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    module.use_reference_cache(cache)
    for got, want in zip(losses(module, data), exact):
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert not calls
    module.use_reference_cache(None)
    losses(module, data)
    assert len(calls) == len(data)
    other = SafeFineTuning(build_tiny_llama(seed=1), reference="model_copy")
    other.configure_model()
    with pytest.raises(ReferenceCacheError, match="was built for reference"):
        other.use_reference_cache(cache)


def tiny_chat_cache(model_dir, path, top_k: int, **module_kwargs) -> ReferenceCache:
    """A cache of every training row of tests/test_checkpoint.py's runs (the tiny chat data, batch 4)."""
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(model_dir), batch_size=4, max_length=256, seed=0)
    module = SafeFineTuning(str(model_dir), **module_kwargs)
    return module.precompute_reference(data.train_dataloader(), str(path), top_k=top_k)


def test_a_run_with_a_cache_resumes_exactly_and_refuses_another_cache(tiny_model_dir, tmp_path):
    cache = tiny_chat_cache(tiny_model_dir, tmp_path / "k32", 32, reference="model_copy")
    # 8 steps with a checkpoint at step 3 (mid-epoch), resumed from it to step 8: the same weights, bit for bit.
    checkpoint = check_resume(tiny_model_dir, tmp_path, reference="model_copy", reference_cache=str(cache.path))
    assert checkpoint["lightning_safety"]["reference_cache_digest"] == cache.digest

    other = tiny_chat_cache(tiny_model_dir, tmp_path / "k16", 16, reference="model_copy")
    assert other.digest != cache.digest
    with pytest.raises(LightningSafetyError, match="trained with another reference cache .*resume with the cache it used"):
        run(tiny_model_dir, tmp_path / "other", max_steps=8, ckpt_path=tmp_path / "full" / "step=3.ckpt",
            reference="model_copy", reference_cache=str(other.path))
    assert not any((tmp_path / "other").rglob("*.ckpt"))


def test_a_cached_run_exports_without_its_cache(tiny_model_dir, tmp_path):
    """The cache is a training aid: exporting the checkpoint after deleting it still works."""
    import shutil

    from lightning_safety.commands import export

    cache = tiny_chat_cache(tiny_model_dir, tmp_path / "cache", 16, reference="model_copy")
    run(tiny_model_dir, tmp_path / "run", max_steps=3, checkpoint_every=3, reference="model_copy",
        reference_cache=str(cache.path))
    shutil.rmtree(cache.path)
    folder = export(str(tmp_path / "run" / "step=3.ckpt"), str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "config.json").is_file() and folder == str(tmp_path / "exported")
