"""The tokenizer a callback works with: given to it, or found on the LightningModule or the datamodule."""

from __future__ import annotations

import os
from typing import Any

import lightning as L

from lightning_safety.errors import LightningSafetyError


def resolve_tokenizer(spec: Any, trainer: L.Trainer, pl_module: L.LightningModule, owner: str) -> Any:
    """``spec`` (a tokenizer, or a name/path to load one from), else ``pl_module.tokenizer``, else the
    datamodule's ``tokenizer`` (loaded when it is a name).

    Raises:
        LightningSafetyError: none of them holds a tokenizer (``owner`` names the callback in the message).
    """
    if spec is None:
        spec = getattr(pl_module, "tokenizer", None)
    if spec is None and trainer.datamodule is not None:
        spec = getattr(trainer.datamodule, "tokenizer", None)
    if spec is None:
        raise LightningSafetyError(
            f"{owner} found no tokenizer: pass tokenizer=..., or expose `tokenizer` on the LightningModule or the "
            "datamodule"
        )
    if isinstance(spec, (str, os.PathLike)):
        from lightning_safety.models import load_tokenizer

        spec = load_tokenizer(os.fspath(spec))
    return spec
