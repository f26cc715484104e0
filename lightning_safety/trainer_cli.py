"""The LightningCLI behind ``lightning-safety fit|validate|test|predict``.

Kept apart from :mod:`lightning_safety.cli` so that ``lightning-safety --help`` and the safety
commands (``score``, ``probe fit``, ...) start without importing Lightning.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_safety.cli_help import DESCRIPTION, PROG


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


def run_trainer_cli(argv: list[str] | None) -> SafetyCLI:
    """Run ``fit``/``validate``/``test``/``predict`` on :class:`SafeFineTuning` and :class:`ChatSFTDataModule`.

    ``argv`` None: Lightning reads ``sys.argv`` itself (without the warning it gives for ``args``).
    """
    from lightning_safety.checkpointing import AtomicCheckpoints
    from lightning_safety.data import ChatSFTDataModule
    from lightning_safety.module import SafeFineTuning
    from lightning_safety.quiet import hide_lightning_tips

    hide_lightning_tips()
    return SafetyCLI(
        SafeFineTuning,
        ChatSFTDataModule,
        args=argv,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION},
        save_config_callback=SaveConfigOnStart,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [AtomicCheckpoints()]},  # a crash never leaves a torn checkpoint
    )
