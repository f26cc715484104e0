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
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_safety.commands import is_command, run_command
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.errors import LightningSafetyError
from lightning_safety.module import SafeFineTuning


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
        if is_command(argv):
            return run_command(argv)
        return SafetyCLI(
            SafeFineTuning,
            ChatSFTDataModule,
            args=argv,
            parser_kwargs={"description": "Fine-tune chat LLMs while keeping them safe (adaptive KL)."},
            save_config_callback=SaveConfigOnStart,
            save_config_kwargs={"overwrite": True},
        )
    except Exception as error:
        ours = _find_our_error(error)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def _find_our_error(error: BaseException | None) -> LightningSafetyError | None:
    """Our error itself, or the one a library (e.g. jsonargparse instantiating a class) wrapped."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LightningSafetyError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
