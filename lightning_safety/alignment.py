"""Moved to :mod:`lightning_safety.experiments.alignment` (an experiment, not the library); this path re-exports its names."""

from lightning_safety.experiments.alignment import *  # noqa: F403 (its public names: AlignmentSettings, build_aligned_reference, ...)
from lightning_safety.experiments.alignment import __all__  # noqa: F401
