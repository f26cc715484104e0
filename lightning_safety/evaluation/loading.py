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
    is loaded and the checkpoint's trained weights, e.g. the LoRA adapter, are put on it): a full
    checkpoint file or a sharded checkpoint folder (FSDP2, ``save_distributed_checkpoint``).
    ``adapter`` puts a saved PEFT adapter on the model. ``tokenizer`` overrides where the
    tokenizer comes from (default: the model's).
    """
    from lightning_safety.models import load_adapter, load_causal_lm, load_tokenizer

    path = Path(model)
    if path.suffix == ".ckpt":
        network, source = load_checkpoint_policy(path)
    else:
        network, source = load_causal_lm(model, dtype=dtype), model
    if adapter is not None:
        network = load_adapter(network, adapter, trainable=False)
    network.requires_grad_(False)
    return network.eval(), load_tokenizer(tokenizer or source)


def is_sharded_checkpoint(path: Path) -> bool:
    """A folder written by ``torch.distributed.checkpoint`` (Lightning's sharded checkpoints)."""
    return path.is_dir() and (path / ".metadata").is_file()


def load_checkpoint_file(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file (tensors only), with an unreadable file refused in one line.

    A file cut short by a crash during its save, an empty file or a foreign pickle raise
    :class:`ModelLoadError` instead of the unpickler's error.
    """
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as error:
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        raise ModelLoadError(
            f"checkpoint {path} is unreadable (truncated, or not a PyTorch checkpoint: {reason}): "
            "use the last complete checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _checkpoint_kind(path: Path) -> str:
    """``"file"`` or ``"sharded"``; anything else is refused in one line."""
    if path.is_file():
        return "file"
    if is_sharded_checkpoint(path):
        return "sharded"
    if path.is_dir():
        raise ModelLoadError(
            f"checkpoint folder {path} holds no sharded checkpoint (no .metadata file): give a .ckpt file or the "
            "folder a sharded run wrote"
        )
    raise ModelLoadError(f"checkpoint {path} not found: give a .ckpt file or a sharded checkpoint folder")


def _require_ours(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    if "lightning_safety" not in checkpoint:
        raise ModelLoadError(
            f"{path} was not written by SafeFineTuning (no 'lightning_safety' entry): use a checkpoint of this "
            "library, or the model folder or adapter it came from"
        )
    return checkpoint


def check_checkpoint(path: str | Path) -> None:
    """Refuse, in one line, a checkpoint path that SafeFineTuning cannot resume from (cheap: the file is
    memory-mapped, tensors are not read)."""
    path = Path(path)
    if _checkpoint_kind(path) == "file":
        _require_ours(load_checkpoint_file(path, mmap=True), path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A SafeFineTuning checkpoint as one dict: a ``.ckpt`` file, or a sharded folder gathered in CPU memory.

    Raises:
        ModelLoadError: the path does not exist, or is not a checkpoint SafeFineTuning wrote.
    """
    path = Path(path)
    if _checkpoint_kind(path) == "file":
        return _require_ours(load_checkpoint_file(path), path)
    try:
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
    except ImportError as error:  # a private helper: say how to do it by hand if it moves
        raise ModelLoadError(
            f"cannot read the sharded checkpoint {path} with this Lightning version: consolidate it first "
            "(python -m lightning.fabric.utilities.consolidate_checkpoint <folder>) and pass the file"
        ) from error
    return _require_ours(_load_distributed_checkpoint(path), path)


def load_checkpoint_policy(path: str | Path) -> tuple[nn.Module, str]:
    """The trained policy of a SafeFineTuning checkpoint (file or sharded folder) and its base model's name.

    The base model named in the checkpoint's hyperparameters is loaded and the checkpoint's
    weights (the LoRA adapter, or every weight of a full fine-tuning) are put on it; the policy
    keeps its PEFT wrapper under LoRA.
    """
    from lightning_safety.module import SafeFineTuning

    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    source = hparams.get("model")
    if not isinstance(source, str):
        raise ModelLoadError(f"{path} does not name its base model (it was built from a model object): pass --model")
    # What load_from_checkpoint does, from the dict already in memory (a sharded folder has no file to reread).
    module = SafeFineTuning(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.on_load_checkpoint(checkpoint)  # builds the model, restores the schedule
    module.load_state_dict(checkpoint["state_dict"])  # strict about the trained weights
    return module.policy, source
