"""Real 2-process DDP on CPU (gloo): identical weights on both ranks and a global logged loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts import run_script

from lightning_safety.module import SafeFineTuning

WORKER = Path(__file__).with_name("ddp_worker.py")


def pad_and_concatenate(first: dict, second: dict, pad_id: int) -> dict:
    length = max(first["input_ids"].shape[1], second["input_ids"].shape[1])

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    return {
        "input_ids": torch.cat([pad(first["input_ids"], pad_id), pad(second["input_ids"], pad_id)]),
        "attention_mask": torch.cat([pad(first["attention_mask"], 0), pad(second["attention_mask"], 0)]),
        "labels": torch.cat([pad(first["labels"], -100), pad(second["labels"], -100)]),
        "risk": torch.cat([first["risk"], second["risk"]]),
    }


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_ddp_two_processes_identical_weights_global_loss_and_shared_risk_cache(tiny_model_dir, tmp_path, normalization):
    run_script(WORKER, tmp_path, tiny_model_dir, normalization)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=0, atol=0, msg=f"{name} differs between ranks")
    first = [rank["first_batch"] for rank in ranks]
    assert set(first[0]["id"]).isdisjoint(first[1]["id"]), "the two ranks must see different examples"

    # The loss logged at step 0 is the one a single process computes on both ranks' batches together.
    single = SafeFineTuning(str(tiny_model_dir), reference="model_copy", normalization=normalization)
    single.configure_model()
    with torch.no_grad():
        out, _, _ = single.compute_loss(pad_and_concatenate(*first, pad_id=256), update_schedule=False)
        local = [single.compute_loss(batch, update_schedule=False)[0].loss for batch in first]
    for rank in ranks:
        assert abs(rank["losses"][0] - float(out.loss)) < 1e-5
    if normalization == "token":
        # ... which is not the plain average of the per-rank losses (different token counts) ...
        assert abs(float(out.loss) - float(sum(local) / 2)) > 1e-6
    else:
        # ... but is when every row weighs the same and both ranks have 3 rows.
        assert abs(float(out.loss) - float(sum(local) / 2)) < 1e-6
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # Risk: each example scored once across both ranks and both epochs (caches merged at epoch end).
    scored = ranks[0]["scored_ids"] + ranks[1]["scored_ids"]
    assert sorted(scored) == sorted(set(ranks[0]["train_ids"]))
