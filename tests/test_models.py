"""Model loading: dtypes, aliases and folders, and the tokenizer check of a separate reference."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from lightning_safety.errors import IncompatibleReferenceError, ModelLoadError
from lightning_safety.models import LoraSettings, load_causal_lm, load_tokenizer, resolve_model_source
from lightning_safety.module import SafeFineTuning
from lightning_safety.tiny_model import build_byte_tokenizer, build_tiny_llama


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)])
def test_dtype_names(tiny_model_dir, name, dtype):
    assert load_causal_lm(str(tiny_model_dir), dtype=name).dtype == dtype


def test_unknown_dtype_is_a_one_line_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_causal_lm(str(tiny_model_dir), dtype="float8")


def test_folder_without_config_and_non_gguf_file_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"0")
    for path, words in ((tmp_path / "empty", "no config.json"), (tmp_path / "weights.bin", "not a .gguf")):
        with pytest.raises(ModelLoadError, match=words):
            resolve_model_source(str(path))


def test_invalid_lora_settings_are_refused():
    with pytest.raises(ModelLoadError, match="r must be a positive integer"):
        LoraSettings(r=0)


def test_tokenizer_chat_template_override_and_pad_fallback(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), chat_template="{{ messages[0]['content'] }}")
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    assert tokenizer.pad_token is not None


def test_separate_reference_with_a_differently_numbered_tokenizer_is_refused(tiny_model_dir, tmp_path):
    # Same vocabulary size, different ids: the KL would compare unrelated tokens.
    shuffled = build_byte_tokenizer()
    state = json.loads(shuffled.backend_tokenizer.to_str())
    symbols = sorted(state["model"]["vocab"])
    state["model"]["vocab"] = {symbol: 255 - index for index, symbol in enumerate(symbols)}  # reversed ids
    shuffled._tokenizer = Tokenizer.from_str(json.dumps(state))
    assert len(shuffled) == len(build_byte_tokenizer())
    build_tiny_llama().save_pretrained(tmp_path / "other")
    shuffled.save_pretrained(tmp_path / "other")
    module = SafeFineTuning(str(tiny_model_dir), reference="separate", reference_model=str(tmp_path / "other"))
    with pytest.raises(IncompatibleReferenceError, match="different ids"):
        module.configure_model()


def test_an_unknown_hub_id_fails_in_seconds_without_network(tmp_path):
    """Without HF_HUB_OFFLINE, the hub client retries an unreachable hub for ~50 s before failing; an id that is
    neither cached nor reachable is refused after one connection attempt (with network: the hub's own 404)."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty hub cache
    code = ("from lightning_safety.models import load_causal_lm\n"
            "try:\n    load_causal_lm('nobody/no-such-model-xyz')\n"
            "except Exception as error:\n    print(type(error).__name__, error)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert done.stdout.startswith("ModelLoadError") and "no-such-model-xyz" in done.stdout, done.stdout + done.stderr
    assert seconds < 30, f"took {seconds:.0f} s"
