"""The harmful fine-tuning attack setting: benign task data with a fraction of harmful rows mixed in.

Rows are drawn without replacement, the count of harmful rows is ``harmful_fraction * size``
rounded half up, and the order is shuffled; all randomness comes from ``random.Random(seed)``, so
a seed gives the same mix on every machine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_safety.errors import DataError


def attack_mix_plan(
    num_benign: int,
    num_harmful: int,
    *,
    harmful_fraction: float,
    size: int | None = None,
    seed: int = 0,
) -> list[tuple[bool, int]]:
    """Which rows make up the mix: a shuffled list of ``(is_harmful, index into its source)``.

    Args:
        num_benign: Rows available in the benign source.
        num_harmful: Rows available in the harmful source.
        harmful_fraction: Share of harmful rows in the mix, in [0, 1].
        size: Rows in the mix; defaults to ``num_benign``.
        seed: Seed of the draw and of the shuffle.

    Raises:
        DataError: Fraction outside [0, 1], negative size, or not enough rows in a source.
    """
    if not (isinstance(harmful_fraction, (int, float)) and 0.0 <= harmful_fraction <= 1.0):
        raise DataError(f"harmful_fraction is {harmful_fraction}; use a number in [0, 1]")
    size = num_benign if size is None else size
    if size < 0:
        raise DataError(f"mix size is {size}; use a non-negative number of rows")
    harmful_count = math.floor(harmful_fraction * size + 0.5)
    benign_count = size - harmful_count
    for kind, needed, available, field in (
        ("harmful", harmful_count, num_harmful, "harmful"),
        ("benign", benign_count, num_benign, "train"),
    ):
        if needed > available:
            raise DataError(
                f"the attack mix needs {needed} {kind} rows (harmful_fraction {harmful_fraction} of size {size}) "
                f"but the {kind} source has {available}: lower harmful_fraction or the mix size, or add rows to "
                f"data.{field}"
            )
    rng = random.Random(seed)
    plan = [(False, i) for i in rng.sample(range(num_benign), benign_count)]
    plan += [(True, i) for i in rng.sample(range(num_harmful), harmful_count)]
    rng.shuffle(plan)
    return plan


def build_attack_mix(
    benign: Sequence[Mapping[str, Any]],
    harmful: Sequence[Mapping[str, Any]],
    *,
    harmful_fraction: float,
    size: int | None = None,
    seed: int = 0,
    field: str = "is_harmful",
) -> list[dict[str, Any]]:
    """A shuffled data set of ``size`` rows, ``harmful_fraction`` of them from ``harmful``.

    Args:
        benign: Benign rows (the user's task data).
        harmful: Harmful rows (the attack data).
        harmful_fraction: Share of harmful rows, in [0, 1] (count rounded half up).
        size: Rows in the mix; defaults to ``len(benign)``.
        seed: Seed of the draw and the shuffle (same seed, same mix).
        field: Field set on every row (copied) to mark it harmful (True) or benign (False).

    Returns:
        New dicts (shallow copies of the chosen rows) with ``field`` set.
    """
    plan = attack_mix_plan(len(benign), len(harmful), harmful_fraction=harmful_fraction, size=size, seed=seed)
    return [{**(harmful if flag else benign)[index], field: flag} for flag, index in plan]
