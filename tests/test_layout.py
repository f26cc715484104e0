"""The package's layout: where each concept lives, old import paths, one-way imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import lightning_safety
import lightning_safety.schedules as schedules_lib
from lightning_safety.module import SafeFineTuning
from lightning_safety.schedules import LinearRiskSchedule, schedule_from_config

PACKAGE = Path(lightning_safety.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every ``lightning_safety.*`` module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_safety"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("lightning_safety"))
    return names


@pytest.mark.parametrize("name", ["LinearRiskSchedule", "ConstantBeta", "ThresholdRiskSchedule", "JudgeScoreSchedule"])
def test_schedules_keep_their_old_import_path(name):
    import lightning_safety.losses as losses_lib

    assert getattr(losses_lib, name) is getattr(schedules_lib, name)


def test_a_checkpoint_naming_the_old_class_path_rebuilds_its_schedule():
    config = {"class_path": "lightning_safety.losses.LinearRiskSchedule", "init_args": {"beta_min": 0.2, "beta_max": 0.7, "ema": None}}
    schedule = schedule_from_config(config)
    assert isinstance(schedule, LinearRiskSchedule) and (schedule.beta_min, schedule.beta_max) == (0.2, 0.7)


def test_the_loss_file_does_not_import_models_or_risk():
    """The loss is a pure function of tensors: it must not pull in model loading or estimators."""
    imported = imported_modules(PACKAGE / "losses.py")
    assert not {m for m in imported if m.startswith(("lightning_safety.models", "lightning_safety.risk", "lightning_safety.module"))}


def test_models_does_not_import_the_loss():
    assert "lightning_safety.losses" not in imported_modules(PACKAGE / "models.py")


def test_risk_is_validated_once_per_training_step(tiny_model_dir, monkeypatch):
    calls = []
    original = schedules_lib.validate_risk

    def counting(risk):
        calls.append(risk.shape)
        return original(risk)

    # Every caller looks the validator up in the schedules module, so one patch sees them all.
    monkeypatch.setattr(schedules_lib, "validate_risk", counting)
    monkeypatch.setattr("lightning_safety.risk.base.validate_risk", counting)
    module = SafeFineTuning(str(tiny_model_dir))
    module.configure_model()
    ids = torch.randint(0, 250, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "risk": torch.tensor([0.0, 0.5, 1.0])}
    module.compute_loss(batch, update_schedule=True)
    assert len(calls) == 1
