"""``lightning-safety``: LightningCLI for fit / validate / test / predict with YAML recipes.

Examples::

    lightning-safety fit --config configs/tiny.yaml
    lightning-safety fit --config configs/smollm2_lora_adaptive.yaml --trainer.max_steps 5
    lightning-safety fit --config configs/tiny.yaml --print_config
    lightning-safety probe fit --model smollm2-135m-instruct --harmful.path advbench.csv --benign.path alpaca.jsonl --output runs/probe
    lightning-safety probe sweep --help
    lightning-safety score --data train.jsonl --judge EmbeddingJudge --output scored.jsonl

Errors caused by configuration or data print as one line (``error: ...``) and exit with 2.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_safety.checkpointing import AtomicCheckpoints
from lightning_safety.commands import is_command, run_command
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.errors import DataError, LightningSafetyError
from lightning_safety.module import SafeFineTuning


# Values of --ckpt_path that Lightning resolves itself (not paths).
_LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc")


class SaveConfigOnStart(SaveConfigCallback):
    """Lightning's config saving, deferred from ``setup`` to the moment training (or validation) starts.

    A run refused while it is being set up (a probe for another model, a bad checkpoint, a
    configuration error found in ``configure_model`` or ``on_fit_start``) then leaves no
    ``config.yaml`` behind that describes a run which never happened.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().setup(trainer, pl_module, getattr(self, "_stage", "fit"))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn != "fit":
            super().setup(trainer, pl_module, getattr(self, "_stage", "validate"))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().setup(trainer, pl_module, getattr(self, "_stage", "test"))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().setup(trainer, pl_module, getattr(self, "_stage", "predict"))


class SafetyCLI(LightningCLI):
    """LightningCLI for :class:`SafeFineTuning` and :class:`ChatSFTDataModule`.

    The data's tokenizer follows the model (``model.model`` -> ``data.tokenizer``), so a recipe
    names its model once.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """As Lightning's, but the model's and the data's arguments take no sub-config files.

        With sub-configs on (Lightning's default), a string given to a parameter whose type
        includes a class (``data.train: str | list[dict] | DataSource``, ``model.model: str |
        nn.Module``) is read as the path of a config file for that class: jsonargparse loads the
        file, and a CSV, TSV or Git LFS pointer parses as one YAML string that then replaces the
        path (``--data.train train.csv`` became the file's text). Paths must stay paths; nested
        values are still given inline or in the ``--config`` recipe.
        """
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        for cls, key in ((self._model_class, "model"), (self._datamodule_class, "data")):
            parser.add_class_arguments(cls, key, fail_untyped=False, instantiate=True, sub_configs=False)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")

    def _parse_ckpt_path(self) -> None:
        """Refuse a missing, truncated or foreign ``--ckpt_path`` in one line, then let Lightning read the
        checkpoint's hyperparameters (it would fail on such a file with the unpickler's traceback)."""
        from lightning_safety.evaluation.loading import check_checkpoint

        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is not None and str(path) not in _LIGHTNING_CKPT_ALIASES and "://" not in str(path) \
                and not str(path).startswith("registry"):
            check_checkpoint(path)
        super()._parse_ckpt_path()


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point (``lightning-safety``)."""
    try:
        run_cli(args)
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Destroy a process group a distributed run left behind, before the interpreter exits: left to
    interpreter shutdown, gloo's threads can be destroyed while joinable and abort the process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_cli(args: Sequence[str] | None = None) -> SafetyCLI | Any:
    """Run the CLI from Python and return it (its ``trainer``, ``model`` and ``datamodule``).

    ``probe fit``, ``probe sweep``, ``score`` and ``evaluate`` go to :mod:`lightning_safety.commands`.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        check_recipes(argv)
        if is_command(argv):
            return run_command(argv)
        return SafetyCLI(
            SafeFineTuning,
            ChatSFTDataModule,
            args=None if args is None else argv,  # None: Lightning reads sys.argv itself, without a warning
            parser_kwargs={"description": "Fine-tune chat LLMs while keeping them safe (adaptive KL)."},
            save_config_callback=SaveConfigOnStart,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [AtomicCheckpoints()]},  # a crash never leaves a torn checkpoint
        )
    except Exception as error:
        ours = _find_our_error(error)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def check_recipes(argv: Sequence[str]) -> None:
    """Refuse a ``--config`` recipe that is missing or not valid YAML, naming the file and the line."""
    import yaml

    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            if path.suffix.lower() in (".yaml", ".yml", ".json"):
                raise DataError(f"recipe {path} not found: check the path (relative paths start at {Path.cwd()})")
            continue  # jsonargparse also takes a recipe given inline as YAML text
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise DataError(f"recipe {path} is not valid YAML ({problem}{where}): fix the file") from None


def _find_our_error(error: BaseException | None) -> LightningSafetyError | None:
    """Our error itself, the one a library (e.g. jsonargparse instantiating a class) wrapped, or a
    configuration error Lightning or a torch optimizer raised (their messages already say what is wrong)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LightningSafetyError):
            return error
        if _is_configuration_error(error):
            return LightningSafetyError(f"{error} (check the trainer and optimizer settings)")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _is_configuration_error(error: BaseException) -> bool:
    """Lightning's MisconfigurationException, or a ValueError raised inside Lightning's trainer or a torch
    optimizer's constructor: both check user settings (devices, val_check_interval, lr, ...)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(error, MisconfigurationException):
        return True
    if type(error) is not ValueError or error.__traceback__ is None:
        return False
    frames = traceback.extract_tb(error.__traceback__)
    origin = Path(frames[-1].filename).as_posix()
    return any(part in origin for part in _CONFIG_CHECKING_CODE)


# Where a plain ValueError is a verdict on the user's settings, not a bug.
_CONFIG_CHECKING_CODE = ("/lightning/pytorch/trainer/", "/lightning/pytorch/loops/", "/lightning/fabric/connector",
                         "/torch/optim/")


if __name__ == "__main__":
    main()
