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

from lightning_safety._lazy import lazy_exports
from lightning_safety.cli_help import top_level_help, wants_top_level_help
from lightning_safety.errors import DataError, LightningSafetyError
from lightning_safety.help_cache import cached_help, is_subcommand_help

# Imported on first use: Lightning (seconds) is loaded only for fit/validate/test/predict.
__getattr__, __dir__ = lazy_exports(__name__, {"lightning_safety.trainer_cli": ("SafetyCLI", "SaveConfigOnStart")})


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point (``lightning-safety``)."""
    try:
        run_cli(args)
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Destroy a process group a distributed run left behind, before the interpreter exits: left to
    interpreter shutdown, gloo's threads can be destroyed while joinable and abort the process."""
    if "torch" not in sys.modules:  # nothing can have started one (--help, a refused command line)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_cli(args: Sequence[str] | None = None) -> Any:
    """Run the CLI from Python and return it (its ``trainer``, ``model`` and ``datamodule``).

    ``probe fit``, ``probe sweep``, ``score``, ``evaluate``, ``demo`` and ``export`` go to
    :mod:`lightning_safety.commands` (and return what the command returns); no arguments, ``-h`` or
    ``--help`` print every subcommand (without importing torch) and exit (status 2 with no arguments).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if wants_top_level_help(argv):
        print(top_level_help(), end="", file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    try:
        if is_subcommand_help(argv):  # printed from the cache after the first time (no Lightning import)
            cached_help(argv, lambda: _dispatch(argv, args))
        check_recipes(argv)
        return _dispatch(argv, args)
    except Exception as error:
        ours = _find_our_error(error)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def _dispatch(argv: list[str], args: Sequence[str] | None) -> Any:
    """Run a command of :mod:`lightning_safety.commands`, or LightningCLI's fit/validate/test/predict."""
    from lightning_safety.commands import is_command, run_command

    if is_command(argv):
        return run_command(argv)
    from lightning_safety.trainer_cli import run_trainer_cli

    return run_trainer_cli(None if args is None else argv)  # None: Lightning reads sys.argv, without a warning


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
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")  # not loaded: none raised
    if lightning_errors is not None and isinstance(error, lightning_errors.MisconfigurationException):
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
