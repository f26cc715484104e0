"""Load a model to evaluate: a hub id, folder, GGUF file, alias, PEFT adapter or training checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_safety.errors import ModelLoadError


def load_model_for_evaluation(
    model: str,
    *,
    adapter: str | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> tuple[nn.Module, Any]:
    """The causal LM and its tokenizer, ready for generation.

    ``model`` is a hub id, local folder, ``.gguf`` file, alias, or a ``.ckpt`` written by
    :class:`~lightning_safety.module.SafeFineTuning` (the base model named in its hyperparameters
    is loaded and the checkpoint's trained weights, e.g. the LoRA adapter, are put on it).
    ``adapter`` puts a saved PEFT adapter on the model. ``tokenizer`` overrides where the
    tokenizer comes from (default: the model's).
    """
    from lightning_safety.models import load_adapter, load_causal_lm, load_tokenizer

    path = Path(model)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ModelLoadError(f"checkpoint {model} not found: check the path")
        network, source = _from_checkpoint(path)
    else:
        network, source = load_causal_lm(model, dtype=dtype), model
    if adapter is not None:
        network = load_adapter(network, adapter, trainable=False)
    network.requires_grad_(False)
    return network.eval(), load_tokenizer(tokenizer or source)


def _from_checkpoint(path: Path) -> tuple[nn.Module, str]:
    import torch

    from lightning_safety.module import SafeFineTuning

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "lightning_safety" not in checkpoint:
        raise ModelLoadError(
            f"{path} was not written by SafeFineTuning: evaluate the model folder or adapter it came from instead"
        )
    source = checkpoint.get("hyper_parameters", {}).get("model")
    if not isinstance(source, str):
        raise ModelLoadError(f"{path} does not name its base model (it was built from a model object): pass --model")
    module = SafeFineTuning.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.policy, source
