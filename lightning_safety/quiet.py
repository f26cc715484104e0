"""Quiet short, programmatic training runs (alignment, the demo's and the benchmark's fine-tunings)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")


class _NoPromotionalTips(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." lines (advertisements, not information about the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def hide_lightning_tips() -> None:
    """Keep Lightning's promotional tips out of the output of every trainer in this process (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoPromotionalTips) for f in logger.filters):
        logger.addFilter(_NoPromotionalTips())


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
