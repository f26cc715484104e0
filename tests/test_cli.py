"""LightningCLI: every config parses, the tiny ones run, bad input is one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_safety.cli import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
# Recipes that run in seconds on a CPU (every other config is parsed only).
RUNNABLE = {"tiny.yaml"}


def run_console(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_safety.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {"tiny.yaml", "smollm2_lora_adaptive.yaml", "llama3_8b_lora_adaptive.yaml",
            "qwen2_5_7b_lora_adaptive.yaml", "tiny_ddp.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load(config.read_text())
    assert printed["model"]["model"] == original["model"]["model"]
    for section in ("trainer", "model", "data"):
        for key, value in original.get(section, {}).items():
            if not isinstance(value, dict):
                assert _given_values_kept(printed[section][key], value), f"{config.name}: {section}.{key}"


def _given_values_kept(printed, given) -> bool:
    """Every value the YAML gives is in the printed config (which adds the defaults it left out)."""
    if isinstance(given, dict):
        return isinstance(printed, dict) and all(k in printed and _given_values_kept(printed[k], v) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(printed, list) and len(printed) == len(given) and all(
            _given_values_kept(p, g) for p, g in zip(printed, given)
        )
    return printed == given


@pytest.mark.parametrize("config", sorted(RUNNABLE))
def test_tiny_config_fits_through_the_cli(config, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run_cli(["fit", "--config", f"configs/{config}", "--trainer.default_root_dir", str(tmp_path)])


def test_fit_logs_the_loss_terms(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run_cli([
        "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ])
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/nll", "train/kl", "train/beta_mean", "train/regularized_fraction",
                 "train/risk_mean", "val/loss"):
        assert name in metrics


def test_help_is_readable():
    result = run_console("fit", "--help")
    assert result.returncode == 0
    for option in ("--model.lora", "--model.schedule", "--model.reference", "--data.train", "--data.max_length"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model.model", "./no/such/model"], "not found"),
        (["--model.lora.target_modules", "[c_attn]"], "target modules"),
        (["--model.schedule.init_args.beta_min", "0.95"], "beta_min"),
        (["--data.max_length", "20"], "truncated away"),
    ],
    ids=["unknown-model", "lora-targets", "beta-order", "truncated-response"],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, words):
    result = run_console("fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and words in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_validate_test_and_predict_run_on_the_tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    common = ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)]
    validated = run_cli(["validate", *common]).trainer.callback_metrics
    assert {"val/loss", "val/nll", "val/kl", "val/beta_mean"} <= set(validated)
    assert abs(float(validated["val/kl"])) < 1e-6  # an untrained policy equals its reference
    tested = run_cli(["test", *common]).trainer.callback_metrics
    assert torch.isclose(tested["test/loss"], validated["val/loss"], atol=1e-5)  # test = the validation rows
    cli = run_cli(["predict", *common, "--return_predictions", "true"])
    rows = [row for batch in cli.trainer.predict_loop.predictions for row in zip(batch["id"], batch["risk"].tolist())]
    assert len(rows) == len(cli.datamodule.train_ids) and {i for i, _ in rows} == set(cli.datamodule.train_ids)


def test_lr_scheduler_from_the_command_line_steps_every_optimizer_step(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cli = run_cli([
        "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
        "--model.lr_scheduler=torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size=1",
        "--model.lr_scheduler.gamma=0.5",
    ])
    assert cli.trainer.global_step == 4
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**4)
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in cli.model.policy.parameters()}  # not the frozen reference


def test_ddp_recipe_runs_two_processes_from_the_console(tmp_path):
    # A cold model cache: both ranks build the tiny model after the process group is up, where
    # transformers writes weights only on rank 0 (rank 1 used to publish a folder without them).
    cache = tmp_path / "cache"
    result = run_console("fit", "--config", "configs/tiny_ddp.yaml", "--trainer.default_root_dir", str(tmp_path),
                         env={"LIGHTNING_SAFETY_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    built = cache / "tiny-random-llama-seed0"
    assert (built / "config.json").is_file() and (built / "model.safetensors").is_file()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    assert "Tip:" not in result.stderr + result.stdout  # Lightning's advertisements are filtered out


def _tiny_rows() -> list[dict]:
    import json

    return [json.loads(line) for line in (REPO_ROOT / "configs" / "data" / "tiny_chat.jsonl").read_text().splitlines()]


def _write_table(rows: list[dict], path: Path) -> Path:
    """The tiny chat rows (prompt, response, risk) as CSV, TSV, parquet or JSON, by the path's suffix."""
    import pandas as pd

    frame = pd.DataFrame([{"prompt": r["prompt"], "response": r["response"], "risk": r["risk"]} for r in rows])
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":  # TSV has no quoting: a cell holds no tab and no newline
        lines = ["prompt\tresponse\trisk"] + [
            f"{r['prompt']}\t{r['response'].replace(chr(10), ' ')}\t{r['risk']}" for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".json"])
@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_table_files_train_from_the_command_line_and_from_yaml(suffix, where, tmp_path):
    """A path to a CSV/TSV/parquet/JSON file stays a path (it used to be replaced by the file's text)."""
    data = _write_table(_tiny_rows(), tmp_path / f"train{suffix}")
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path / "run")]
    if where == "yaml":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"data": {"train": str(data)}}))
        args += ["--config", str(recipe)]
    else:
        args += ["--data.train", str(data)]
    cli = run_cli(args)
    assert cli.datamodule.train_source == str(data)
    assert cli.trainer.global_step == 1
    assert len(cli.datamodule.train_records) == 18  # 24 rows less the 25% validation split


def test_model_path_to_a_non_model_file_stays_a_path(tmp_path, capsys):
    """A Git LFS pointer given as a .gguf model is named by its path in the error, not by its text."""
    pointer = tmp_path / "model.gguf"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--model.model", str(pointer),
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "git-lfs" not in error.split(str(pointer))[0] and str(pointer) in error


def test_a_refused_run_leaves_no_config_and_a_run_that_starts_writes_one(tmp_path, capsys):
    refused, started = tmp_path / "refused", tmp_path / "started"
    base = ["fit", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*base, "--trainer.default_root_dir", str(refused), "--trainer.callbacks+=faults.FailOnFitStart"])
    assert exit_info.value.code == 2 and "injected refusal" in capsys.readouterr().err
    assert not refused.exists() or list(refused.rglob("config.yaml")) == []
    run_cli([*base, "--trainer.default_root_dir", str(started)])
    assert [p.name for p in started.rglob("config.yaml")] == ["config.yaml"]
