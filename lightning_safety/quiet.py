"""Quiet short, programmatic training runs (alignment, the demo's and the benchmark's fine-tunings)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")


@contextlib.contextmanager
def quiet_training(enabled: bool = True) -> Iterator[None]:
    """Hide warnings that are expected in these runs; with ``enabled``, also Lightning's set-up chatter.

    Expected: rows cut at ``max_length`` (generated answers are cut on purpose), no validation data,
    no loader workers for a few hundred rows, and no KL tokens when beta is 0 for every row.
    """
    loggers = [logging.getLogger(name) for name in _LOGGERS] if enabled else []
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*longer than max_length.*")
            warnings.filterwarnings("ignore", message=r".*Total length of .* across ranks is zero.*")
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
