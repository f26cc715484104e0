"""What the benchmarks share: progress lines, one-line failures, percentages and the public data they read."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results"
T0 = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    """Stop with one line (exit status 1)."""
    sys.exit(f"error: {message}")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def read_public_data(data_dir: Path, needed: tuple[str, ...], *, unique_advbench: bool = False) -> dict[str, Any]:
    """AdvBench goals, Alpaca instructions, SST-2 train (sentence, label) and, when listed in ``needed``,
    GSM8K train rows, from the shared public data folder (refused in one line when a file is missing).

    ``unique_advbench`` drops repeated goals (AdvBench lists a few twice); the replication keeps them so that
    its committed split stays the same.
    """
    missing = [name for name in needed if not (data_dir / name).is_file()]
    if missing:
        fail(f"data folder {data_dir} lacks {', '.join(missing)}: pass --data pointing at the shared public data")
    with open(data_dir / "advbench_harmful_behaviors.csv", newline="", encoding="utf-8") as handle:
        advbench = [row["goal"].strip() for row in csv.DictReader(handle)]
    with open(data_dir / "alpaca_instructions.jsonl", encoding="utf-8") as handle:
        alpaca = [json.loads(line)["instruction"].strip() for line in handle if line.strip()]
    with open(data_dir / "sst2_train.tsv", newline="", encoding="utf-8") as handle:
        sst2 = [(row["sentence"].strip(), int(row["label"])) for row in csv.DictReader(handle, delimiter="\t")]
    data: dict[str, Any] = {"advbench": list(dict.fromkeys(advbench)) if unique_advbench else advbench,
                            "alpaca": alpaca, "sst2_train": sst2}
    if "gsm8k_train.jsonl" in needed:
        with open(data_dir / "gsm8k_train.jsonl", encoding="utf-8") as handle:
            data["gsm8k"] = [json.loads(line) for line in handle if line.strip()]
    return data
