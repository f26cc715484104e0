"""The package root: every name in ``__all__`` imports, ``import lightning_safety`` stays instant, the README lists them."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_safety

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", lightning_safety.__all__)
def test_every_exported_name_imports_from_the_root(name):
    namespace: dict = {}
    exec(f"from lightning_safety import {name}", namespace)
    value = namespace[name]
    assert value is getattr(lightning_safety, name) and name in dir(lightning_safety)
    assert getattr(value, "__module__", "").startswith("lightning_safety.")  # ours, from the module named for it


def test_root_exports_what_a_newcomer_needs():
    from lightning_safety import (  # noqa: F401  (the import is the test)
        ActivationProbe,
        ActivationRiskCallback,
        ChatSFTDataModule,
        EmbeddingJudge,
        HTTPJudge,
        JudgeRiskCallback,
        LightningSafetyError,
        LinearRiskSchedule,
        MaxRisk,
        ProbeRisk,
        PromptSource,
        RiskAuditLog,
        RiskCallback,
        SafeFineTuning,
        SafetyDriftController,
        SafetyEvaluationCallback,
        SafetyGate,
        adaptive_kl_loss,
        read_audit_log,
        score_prompts,
    )

    assert issubclass(LightningSafetyError, ValueError) and lightning_safety.__version__
    assert sorted(lightning_safety.__all__) == lightning_safety.__all__ and len(set(lightning_safety.__all__)) == len(
        lightning_safety.__all__)


def test_unknown_names_and_submodules_behave_as_usual():
    with pytest.raises(AttributeError, match="no attribute 'SafeFinetuning'"):
        lightning_safety.SafeFinetuning  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lightning_safety import SafeFinetuning", {})
    from lightning_safety import alignment  # a submodule, not an export

    assert alignment is importlib.import_module("lightning_safety.alignment")


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, lightning_safety; print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_the_readme_lists_every_exported_name():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section))
    assert set(lightning_safety.__all__) <= listed, sorted(set(lightning_safety.__all__) - listed)
