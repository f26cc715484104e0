"""The saved probe: :class:`ActivationProbe` (classifier + the model, layers and pooling it reads),
its save/load as ``probe.safetensors`` + ``probe.json``, and the model fingerprint that ties it to one model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.errors import ProbeError, ProbeMismatchError
from lightning_safety.models import is_peft_model
from lightning_safety.paths import atomic_directory
from lightning_safety.risk.calibration import CalibratedThreshold, calibrate_threshold
from lightning_safety.risk.hooks import LayerTaps, find_decoder_layers
from lightning_safety.risk.probe.features import extract_features, featurize_prompts
from lightning_safety.risk.probe.training import ProbeClassifier

PROBE_FORMAT = "lightning_safety.activation_probe"
PROBE_VERSION = 1
WEIGHTS_FILE = "probe.safetensors"
METADATA_FILE = "probe.json"


# ---------------------------------------------------------------------------------------------
# Which model a probe belongs to

_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "attn_implementation",
})
_SAMPLE = 16  # values hashed from each end of every parameter


def _stable_config(value: Any) -> Any:
    """Config without runtime or provenance fields (keys starting with '_' included, e.g. _name_or_path)."""
    if isinstance(value, Mapping):
        return {
            str(key): _stable_config(item)
            for key, item in value.items()
            if str(key) not in _VOLATILE_CONFIG_KEYS and not str(key).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(item) for item in value]
    return value


def _base_parameter_name(name: str) -> str | None:
    """The parameter's name in the unwrapped model, or None for a PEFT adapter's own parameter."""
    parts = name.split(".")
    if any(part.startswith("lora_") or part == "modules_to_save" for part in parts):
        return None
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft_model(model) else model


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the base model's config, parameter names/shapes, and sampled weight values.

    Contents: the config JSON (sorted keys, without volatile fields such as ``_name_or_path``,
    ``transformers_version``, ``dtype``), then for every base parameter (PEFT adapter weights
    skipped, PEFT wrapper names undone) its name, shape, and its first and last 16 values rounded
    to bfloat16. Cheap (no full pass over the weights); any fine-tuning of the base changes it; the
    same weights held in float32 or bfloat16 give the same fingerprint; a LoRA adapter does not.
    A model sharded by FSDP2 gathers each parameter once (all ranks must call this together).
    """
    base = _base_model(model)
    hasher = hashlib.sha256()
    config = getattr(base, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    hasher.update(json.dumps(_stable_config(config_dict), sort_keys=True, default=str).encode())
    for name, parameter in base.named_parameters():
        clean = _base_parameter_name(name)
        if clean is None:
            continue
        hasher.update(f"{clean}:{tuple(parameter.shape)};".encode())
        _hash_sample(hasher, parameter)
    return hasher.hexdigest()


def adapter_fingerprint(model: nn.Module, adapter_name: str) -> str:
    """sha256 hex of one PEFT adapter's parameter names, shapes and sampled values (as in
    :func:`model_fingerprint`, which skips adapters): e.g. the frozen ``reference`` adapter a run
    under ``adapter_copy`` reads. A model without that adapter hashes nothing. Collective under FSDP2.
    """
    hasher = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if f".{adapter_name}." in name:
            hasher.update(f"{name}:{tuple(parameter.shape)};".encode())
            _hash_sample(hasher, parameter)
    return hasher.hexdigest()


def _hash_sample(hasher: Any, parameter: Tensor) -> None:
    """Add the first and last ``_SAMPLE`` values of ``parameter`` (rounded to bfloat16) to ``hasher``."""
    if parameter.is_meta or parameter.numel() == 0:
        return
    value = parameter.detach()
    if hasattr(value, "full_tensor"):  # a sharded DTensor (FSDP2): every rank gathers it together
        value = value.full_tensor()
    flat = value.reshape(-1)
    sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).to("cpu", torch.bfloat16).float()
    hasher.update(repr(sample.tolist()).encode())


def model_structure(model: nn.Module) -> tuple[int, int]:
    """(number of decoder layers, hidden size) of a causal LM."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_config, "hidden_size", None)
    if hidden is None:
        hidden = base.get_input_embeddings().weight.shape[-1]
    return len(find_decoder_layers(model)), int(hidden)


def _default_model_name(model: nn.Module) -> str:
    config = getattr(_base_model(model), "config", None)
    return str(getattr(config, "_name_or_path", "") or type(_base_model(model)).__name__)


# ---------------------------------------------------------------------------------------------
# The probe artifact


def _write_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


@dataclass
class ActivationProbe:
    """A trained probe and what it needs to be used safely: which model, layers and pooling.

    Attributes:
        classifier: the trained :class:`ProbeClassifier`.
        model_name: name or path of the model it was trained on (for messages).
        fingerprint: :func:`model_fingerprint` of that model.
        layers: non-negative decoder layer indices read.
        pooling: ``"last"``, ``"mean"`` or ``"mean_all_layers"``.
        hidden_size, num_layers: the model's shape (checked before the fingerprint).
        threshold: flag prompts scoring >= threshold (0.5, or calibrated by :meth:`calibrate`).
        metrics: training metrics (see :func:`train_probe`).
        calibration: :class:`CalibratedThreshold` fields, or None.
        system_prompt: system message used when rendering prompts (None = the template's default).
    """

    classifier: ProbeClassifier
    model_name: str
    fingerprint: str
    layers: list[int]
    pooling: str
    hidden_size: int
    num_layers: int
    threshold: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    system_prompt: str | None = None

    def score(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt_length: Tensor,
        taps: LayerTaps | None = None,
        use_adapter: bool = False,
    ) -> Tensor:
        """Harmful probabilities [B] (float32, on ``input_ids``' device) of a right-padded batch."""
        features = extract_features(
            model, input_ids, attention_mask, prompt_length,
            layers=self.layers, pooling=self.pooling, taps=taps, use_adapter=use_adapter,
        )
        self.classifier.to(features.device)
        return self.classifier.predict_proba(features).to(input_ids.device)

    def score_prompts(
        self, model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False
    ) -> Tensor:
        """Harmful probabilities [N] (CPU) of prompts, each rendered as a single user turn."""
        features = featurize_prompts(
            model, tokenizer, prompts, layers=self.layers, pooling=self.pooling,
            batch_size=batch_size, system_prompt=self.system_prompt, progress=progress,
        )
        self.classifier.to("cpu")
        return self.classifier.predict_proba(features)

    def calibrate(
        self, harmful_scores: Tensor, benign_scores: Tensor | None = None, alpha: float = 0.1, delta: float = 0.05
    ) -> CalibratedThreshold:
        """Set ``threshold`` from held-out harmful scores with a recall guarantee (see calibration.py)."""
        result = calibrate_threshold(harmful_scores, alpha=alpha, delta=delta, benign_scores=benign_scores)
        self.threshold, self.calibration = result.threshold, result.to_dict()
        return result

    def metadata(self) -> dict[str, Any]:
        """Everything but the classifier weights (JSON-serialisable)."""
        return {
            "format": PROBE_FORMAT,
            "version": PROBE_VERSION,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "layers": [int(layer) for layer in self.layers],
            "pooling": self.pooling,
            "hidden_size": int(self.hidden_size),
            "num_layers": int(self.num_layers),
            "threshold": float(self.threshold),
            "metrics": self.metrics,
            "calibration": self.calibration,
            "system_prompt": self.system_prompt,
            "classifier": self.classifier.config(),
        }

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``probe.safetensors`` + ``probe.json`` into ``folder``, all or nothing."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise ProbeError(f"{folder} already exists: choose a new folder or pass overwrite=True")
        staging = folder if not folder.exists() else folder.with_name(f".{folder.name}.replace-{os.getpid()}")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.classifier.state_dict().items()}
        with atomic_directory(staging) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE))
            _write_metadata(tmp / METADATA_FILE, self.metadata())
        if staging != folder:  # overwrite: swap in the finished folder, then drop the old one
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> ActivationProbe:
        """Read a saved probe; with ``model``, refuse one trained on a different model.

        Raises:
            ProbeError: missing or unreadable files.
            ProbeMismatchError: the model's layers, hidden size or fingerprint differ.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / METADATA_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ProbeError(
                f"no probe at {folder} ({METADATA_FILE} or {WEIGHTS_FILE} missing): "
                "pass a folder written by ActivationProbe.save or `lightning-safety probe fit`"
            )
        try:
            meta = json.loads((folder / METADATA_FILE).read_text())
        except (OSError, ValueError) as error:
            raise ProbeError(f"{folder / METADATA_FILE} is unreadable ({error}): save the probe again") from error
        if meta.get("format") != PROBE_FORMAT or int(meta.get("version", 0)) > PROBE_VERSION:
            raise ProbeError(
                f"{folder / METADATA_FILE} is not a version <= {PROBE_VERSION} activation probe: "
                "save it with this version of lightning-safety"
            )
        classifier = ProbeClassifier(**meta["classifier"])
        classifier.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        classifier.eval()
        probe = cls(
            classifier=classifier,
            model_name=meta["model_name"],
            fingerprint=meta["fingerprint"],
            layers=[int(layer) for layer in meta["layers"]],
            pooling=meta["pooling"],
            hidden_size=int(meta["hidden_size"]),
            num_layers=int(meta["num_layers"]),
            threshold=float(meta["threshold"]),
            metrics=meta.get("metrics") or {},
            calibration=meta.get("calibration"),
            system_prompt=meta.get("system_prompt"),
        )
        if model is not None:
            probe.check_model(model, where=str(folder))
        return probe

    def check_model(self, model: nn.Module, where: str = "this probe") -> None:
        """Raise :class:`ProbeMismatchError` unless ``model`` is the one the probe was trained on."""
        fix = "train a probe for this model with `lightning-safety probe fit`"
        num_layers, hidden_size = model_structure(model)
        if (num_layers, hidden_size) != (self.num_layers, self.hidden_size):
            raise ProbeMismatchError(
                f"probe at {where} was trained on model '{self.model_name}' with {self.num_layers} layers and "
                f"hidden size {self.hidden_size}, not this model ({num_layers} layers, hidden size {hidden_size}): {fix}"
            )
        fingerprint = model_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise ProbeMismatchError(
                f"probe at {where} was trained on model '{self.model_name}' (fingerprint {self.fingerprint[:12]}...), "
                f"not this model ({fingerprint[:12]}...): {fix}"
            )


__all__ = [
    "METADATA_FILE",
    "PROBE_FORMAT",
    "PROBE_VERSION",
    "WEIGHTS_FILE",
    "ActivationProbe",
    "adapter_fingerprint",
    "model_fingerprint",
    "model_structure",
]
