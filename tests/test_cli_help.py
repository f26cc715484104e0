"""`lightning-safety --help`: every subcommand with one line, printed fast; subcommand help without Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_safety.cli import run_cli
from lightning_safety.cli_help import LIGHTNING_SUBCOMMANDS, SUBCOMMANDS, top_level_help

REPO_ROOT = Path(__file__).resolve().parents[1]


def console(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "lightning_safety.cli", *args], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=300)


def imported(stderr: str) -> set[str]:
    """Top-level packages named in ``-X importtime`` output."""
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")}


def _our_commands(tree: dict, prefix: str = "") -> dict[str, str]:
    """Each command of COMMANDS (``probe fit``, ``score``, ...) -> the first line of its docstring."""
    found = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            found.update(_our_commands(value, f"{prefix}{name} "))
        else:
            found[prefix + name] = value.__doc__.strip().splitlines()[0]
    return found


def test_the_written_out_list_is_every_real_subcommand_with_its_docstring():
    from lightning.pytorch.cli import LightningCLI

    from lightning_safety.commands import COMMANDS

    assert [name for name, _ in LIGHTNING_SUBCOMMANDS] == list(LightningCLI.subcommands())
    assert dict(SUBCOMMANDS) == _our_commands(COMMANDS)
    assert len(SUBCOMMANDS) == len(dict(SUBCOMMANDS))


def test_help_lists_every_subcommand_on_one_line_without_importing_torch():
    result = console("--help", importtime=True)
    assert result.returncode == 0
    assert result.stdout == top_level_help()
    for name, summary in LIGHTNING_SUBCOMMANDS + SUBCOMMANDS:
        assert [line for line in result.stdout.splitlines() if line.split(maxsplit=len(name.split()))[:-1] == name.split()
                and line.endswith(summary)], name
    assert not imported(result.stderr) & {"torch", "lightning", "transformers", "jsonargparse"}
    warnings = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert warnings == []


@pytest.mark.parametrize("args, code, stream", [(["-h"], 0, "out"), ([], 2, "err")], ids=["-h", "no-arguments"])
def test_short_flag_and_no_arguments_print_the_same_help(args, code, stream, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == code
    printed = capsys.readouterr()
    assert getattr(printed, stream) == top_level_help()


@pytest.mark.parametrize("command", ["probe fit", "probe sweep", "judge fit", "score", "evaluate", "demo", "export",
                                     "precompute-reference"])
def test_safety_command_help_does_not_import_lightning(command):
    result = console(*command.split(), "--help", importtime=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: lightning-safety [options] ") and command.split()[-1] in result.stdout.split("\n")[0]
    assert not imported(result.stderr) & {"lightning", "transformers", "torchmetrics", "datasets"}
    assert [line for line in result.stderr.splitlines() if not line.startswith("import time:")] == []


def test_trainer_classes_stay_importable_from_the_cli_module():
    from lightning.pytorch.cli import LightningCLI

    import lightning_safety.cli as cli

    assert issubclass(cli.SafetyCLI, LightningCLI) and cli.SaveConfigOnStart.__name__ == "SaveConfigOnStart"


@pytest.mark.parametrize("package", ["lightning_safety.data", "lightning_safety.evaluation"])
def test_lazy_packages_export_every_name_they_list(package):
    import importlib

    module = importlib.import_module(package)
    assert module.__all__ and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        getattr(module, "no_such_name")
