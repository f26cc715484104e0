"""Subcommand help from the cache: the same text, without importing Lightning, invalidated by edits."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_safety.help_cache as help_cache
from lightning_safety.help_cache import cached_help, help_key, is_subcommand_help

REPLAY = (
    "import sys; from lightning_safety.cli import run_cli\n"
    "try:\n    run_cli(sys.argv[1:])\nexcept SystemExit as done:\n    code = done.code\n"
    "print('LIGHTNING_IMPORTED' if 'lightning' in sys.modules else 'LIGHTNING_NOT_IMPORTED', code, file=sys.stderr)\n"
)


def run_help(argv: list[str], cache, extra_env=None) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "LIGHTNING_SAFETY_CACHE": str(cache), **(extra_env or {})}
    return subprocess.run([sys.executable, "-c", REPLAY, *argv], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("argv", [["fit", "--help"], ["probe", "fit", "-h"]])
def test_the_second_help_is_the_same_text_without_importing_lightning(argv, tmp_path):
    first = run_help(argv, tmp_path)
    second = run_help(argv, tmp_path)
    assert "0" in first.stderr.split()[-1:] and first.stdout.startswith("usage: lightning-safety")
    assert second.stdout == first.stdout
    assert "LIGHTNING_NOT_IMPORTED 0" in second.stderr


def test_a_failing_help_is_not_cached(tmp_path, capsys):
    def broken():
        print("usage: partial")
        raise SystemExit(2)

    with pytest.raises(SystemExit) as done:
        cached_help(["fit", "--help"], broken, folder=tmp_path)
    assert done.value.code == 2 and not list(tmp_path.iterdir())


def test_the_key_follows_the_command_line_and_the_package_sources(tmp_path, monkeypatch):
    (tmp_path / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(help_cache, "_PACKAGE", tmp_path)
    before = help_key(["fit", "--help"])
    assert help_key(["validate", "--help"]) != before
    (tmp_path / "module.py").write_text("x = 2\n")  # an edit of the code: another help
    assert help_key(["fit", "--help"]) != before


@pytest.mark.parametrize(
    "argv,expected",
    [(["fit", "--help"], True), (["probe", "fit", "-h"], True), (["fit", "--config", "x.yaml", "--help"], False),
     (["--help"], False), (["fit"], False)],
)
def test_only_a_bare_subcommand_help_is_cached(argv, expected):
    assert is_subcommand_help(argv) is expected
