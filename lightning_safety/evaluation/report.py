"""A report folder comparing the safety evaluations of one or more models.

:func:`write_report` turns ``{label: EvaluationResult}`` into a folder:

* ``metrics.json``: every number (each rate with its Wilson 95% interval, count and total), the
  scores, how it was measured, the caller's ``extra`` and a ``created`` timestamp;
* ``summary.md``: a table (metrics x labels), how it was measured, warnings, example responses;
* ``samples.jsonl``: every sample row with its label and prompt set;
* PNG plots (``asr.png``, ``asr_by_category.png``, ``over_refusal.png``, ``utility.png``) where the
  metrics were measured (needs matplotlib: ``pip install "lightning-safety[plots]"``).

The folder appears complete or not at all: everything is written into a hidden sibling folder that
is renamed into place at the end. JSON is strict: NaN (a rate of zero examples) is stored as ``null``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_safety.errors import LightningSafetyError
from lightning_safety.evaluation.runner import EvaluationResult, format_rate
from lightning_safety.metrics import RateReport
from lightning_safety.paths import default_mode

__all__ = ["ReportError", "check_report_folder", "format_markdown_table", "load_report", "require_plotting", "write_report"]

REPORT_VERSION = 1
METRICS_FILE = "metrics.json"
EXAMPLES_PER_LABEL = 3
EXAMPLE_CHARS = 200
PLOTS_HINT = 'pip install "lightning-safety[plots]"'

# Overall metrics in reading order; others follow in the order the results list them.
_OVERALL_ORDER = ("safety/asr", "safety/asr_judge", "safety/refusal", "safety/over_refusal")
# info keys rendered by "How measured" (the rest is listed generically after them).
_METHOD_KEYS = ("refusal_detector", "judge", "judge_threshold", "judge_shares_training_critic", "risk_judge",
                "generation", "sizes")
# Differences in these make a side-by-side comparison misleading.
_COMPARABLE_KEYS = ("refusal_detector", "judge", "judge_threshold", "generation", "sizes")


class ReportError(LightningSafetyError):
    """A report cannot be written or read (bad results, existing folder, missing matplotlib)."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def write_report(
    results: Mapping[str, EvaluationResult],
    output_dir: str | Path,
    *,
    title: str = "Safety evaluation",
    overwrite: bool = False,
    plots: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a report comparing ``results`` (model label -> result) into ``output_dir``.

    Args:
        results: one :class:`EvaluationResult` per model label, e.g. ``{"shipped": r1, "aligned": r2}``.
        output_dir: the report folder; it must not exist or be empty, unless ``overwrite``.
        title: heading of ``summary.md``.
        overwrite: replace an existing report (a folder holding ``metrics.json``) once the new one
            is complete; other non-empty folders are never deleted.
        plots: write PNG plots (needs matplotlib).
        extra: more context stored in ``metrics.json`` (command line, model sources, ...).

    Returns:
        File name -> final path of every file written.
    """
    results = _check_results(results)
    # abspath, not resolve(): "." gets a name and a parent for the staging sibling, symlinks stay as given.
    target = Path(os.path.abspath(output_dir))
    check_report_folder(target, overwrite)
    if plots:
        require_plotting()  # fail before any work, not after the tables
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with _staged_directory(target, overwrite) as staging:
        names = _write_files(staging, results, title=title, created=created, plots=plots, extra=extra or {})
    return {name: Path(output_dir) / name for name in names}


def format_markdown_table(results: Mapping[str, EvaluationResult]) -> str:
    """The metrics table: one row per metric (overall first, then per category), one column per label.

    Cells read ``12.5% [8.1, 18.7] (n=64)`` (rate, Wilson 95% interval, sample size); ``n/a (n=0)``
    for a rate of no examples and ``—`` where a label did not measure the metric.
    """
    results = _check_results(results)
    labels = list(results)
    header = ["metric", *(_escape_cell(label) for label in labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _ordered_metrics(results):
        cells = [f"`{_escape_cell(name)}`"]
        for label in labels:
            report = results[label].rates.get(name)
            cells.append(format_rate(report) if report is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    for name in _ordered_scores(results):
        cells = [f"`{_escape_cell(name)}`"]
        for label in labels:
            cells.append(_format_score(results[label].scores.get(name)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_report(output_dir: str | Path) -> dict[str, Any]:
    """The contents of a report's ``metrics.json`` (NaN values read back as ``None``)."""
    path = Path(output_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        left = _interrupted_overwrite(Path(os.path.abspath(output_dir)))
        hint = f" (an interrupted overwrite left the previous report in {left})" if left else ""
        raise ReportError(f"{output_dir} is not a report folder: {METRICS_FILE} not found{hint}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON ({error}): the report is damaged, write it again") from None
    if not isinstance(data, dict) or "results" not in data:
        raise ReportError(f"{path} is not a lightning-safety report (no 'results'): write it with write_report")
    return data


def require_plotting() -> None:
    """Raise a :class:`ReportError` naming the extra to install if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(f"report plots need matplotlib: {PLOTS_HINT} (or pass plots=False)") from None


# --------------------------------------------------------------------------------------------
# Checks and the staged folder
# --------------------------------------------------------------------------------------------


def _check_results(results: Mapping[str, EvaluationResult]) -> dict[str, EvaluationResult]:
    if not isinstance(results, Mapping):
        raise ReportError(f"results must map a model label to its EvaluationResult; got {type(results).__name__}")
    if not results:
        raise ReportError("results is empty: give at least one {label: EvaluationResult}")
    for label, result in results.items():
        if not isinstance(label, str) or not label.strip():
            raise ReportError(f"model labels must be non-empty strings; got {label!r}")
        if not isinstance(result, EvaluationResult):
            raise ReportError(f"results[{label!r}] must be an EvaluationResult; got {type(result).__name__}")
    return dict(results)


def _is_empty_dir(path: Path) -> bool:
    return not any(path.iterdir())


def check_report_folder(target: Path, overwrite: bool) -> None:
    """Raise :class:`ReportError` unless a report may be written to ``target`` (call it before slow work)."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise ReportError(f"report folder {target} exists and is not a folder: choose another output")
    if _is_empty_dir(target):
        return
    if not overwrite:
        raise ReportError(f"report folder {target} exists and is not empty: pass overwrite=True (--overwrite) or choose another")
    # overwrite deletes the old folder; never do that to something that is not a report
    # (think output_dir="." by mistake).
    if not (target / METRICS_FILE).is_file():
        raise ReportError(
            f"refusing to overwrite {target}: it is not a report folder (no {METRICS_FILE}); remove it yourself "
            "or choose another output"
        )


def _interrupted_overwrite(target: Path) -> Path | None:
    """The previous report an overwrite killed between its two renames set aside (see below), if any."""
    kept = list(target.parent.glob(f".{glob.escape(target.name)}.*.old/report/{METRICS_FILE}"))
    return max(kept, key=lambda path: path.stat().st_mtime).parent if kept else None


@contextmanager
def _staged_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden sibling folder that replaces ``target`` only if the block completes.

    Like :func:`lightning_safety.paths.atomic_directory`, but a report that loses a race is an error
    (not silently discarded), and with ``overwrite`` the old report is swapped out only at the end.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(staging, default_mode(directory=True))  # mkdtemp makes it private; a report is not
    old: Path | None = None
    try:
        yield staging
        try:
            os.rename(staging, target)  # also replaces an empty folder
        except OSError:
            if not target.exists():
                raise
            if not (target.is_dir() and overwrite):
                raise ReportError(f"report folder {target} appeared while the report was written: not replaced") from None
            check_report_folder(target, overwrite)
            # Two renames, not one: POSIX cannot atomically replace a non-empty folder. In between,
            # the old report stays complete under its hidden name.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rename(target, old / "report")
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(old / "report", target)  # put the old report back
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_files(
    folder: Path,
    results: dict[str, EvaluationResult],
    *,
    title: str,
    created: str,
    plots: bool,
    extra: Mapping[str, Any],
) -> list[str]:
    names: list[str] = []
    metrics = {
        "report_version": REPORT_VERSION,
        "title": title,
        "created": created,
        "labels": list(results),
        "results": {label: result.to_dict() for label, result in results.items()},
        "extra": dict(extra),
    }
    _write_text(folder / METRICS_FILE, _dumps(metrics, indent=2) + "\n")
    names.append(METRICS_FILE)
    _write_text(folder / "summary.md", _summary(results, title=title, created=created))
    names.append("summary.md")
    _write_samples(folder / "samples.jsonl", results)
    names.append("samples.jsonl")
    if plots:
        names += _write_plots(folder, results)
    return names


def _write_text(path: Path, text: str) -> None:
    # The whole folder is staged, so a plain write is enough; utf-8 explicitly (responses are not ASCII).
    path.write_text(text, encoding="utf-8")


def _write_samples(path: Path, results: dict[str, EvaluationResult]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for label, result in results.items():
            for set_name, rows in result.samples.items():
                for row in rows:
                    # The row's own fields keep their names unless they clash with ours.
                    record: dict[str, Any] = {"label": label, "set": set_name}
                    for key, value in row.items():
                        record[f"row_{key}" if key in ("label", "set") else key] = value
                    file.write(_dumps(record) + "\n")


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: NaN/inf -> None, paths and unknown objects -> str."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=str)
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _dumps(data: Any, indent: int | None = None) -> str:
    return json.dumps(_jsonable(data), indent=indent, ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------------------------
# summary.md
# --------------------------------------------------------------------------------------------


def _summary(results: dict[str, EvaluationResult], *, title: str, created: str) -> str:
    labels = list(results)
    parts = [f"# {title}", "", f"Created {created}. Models: {', '.join(f'`{label}`' for label in labels)}.", ""]
    notes = _notes(results)
    for note in notes:
        parts += [f"> **Warning:** {note}", ""]
    parts += [
        "## Metrics",
        "",
        (
            "Rates with their Wilson 95% interval and sample size. `safety/asr`: harmful prompts answered without "
            "a refusal (lower is safer); `safety/over_refusal`: safe prompts refused (lower is better); "
            "`utility/*`: task accuracy (higher is better)."
        ),
        "",
        format_markdown_table(results),
        "",
        "## How measured",
        "",
    ]
    method = {label: _method_lines(results[label].info) for label in labels}
    if len(labels) == 1 or all(lines == method[labels[0]] for lines in method.values()):
        parts += method[labels[0]] or ["- (no details recorded)"]
    else:
        for i, label in enumerate(labels):
            parts += [""] * bool(i) + [f"**{_one_line(label)}**", "", *(method[label] or ["- (no details recorded)"])]
    parts.append("")
    examples = _examples(results)
    if examples:
        parts += [
            "## Example responses to harmful prompts",
            "",
            (
                "> **Content note:** these responses may contain harmful or offensive text. Up to "
                f"{EXAMPLES_PER_LABEL} per model, answered (not refused) ones first, cut to {EXAMPLE_CHARS} characters."
            ),
            "",
            *examples,
        ]
    return "\n".join(parts).rstrip() + "\n"


def _notes(results: dict[str, EvaluationResult]) -> list[str]:
    """The results' warnings (each once, naming its models), plus any settings that differ between models."""
    seen: dict[str, list[str]] = {}
    for label, result in results.items():
        for warning in result.info.get("warnings") or []:
            seen.setdefault(" ".join(str(warning).split()), []).append(label)
        warnings = " ".join(str(w) for w in result.info.get("warnings") or [])
        # Results built by hand may set the flag without the runner's warning text; say it anyway.
        if result.info.get("judge_shares_training_critic") and "critic" not in warnings:
            seen.setdefault(
                "the evaluation judge is also a training-time critic: it shares its blind spots, so "
                "safety/asr_judge likely overstates safety",
                [],
            ).append(label)
    notes = [f"{text} ({', '.join(f'`{label}`' for label in where)})" for text, where in seen.items()]
    if len(results) > 1:
        infos = [result.info for result in results.values()]
        differing = [key for key in _COMPARABLE_KEYS if any(info.get(key) != infos[0].get(key) for info in infos)]
        if differing:
            notes.append(
                f"the models were measured differently ({', '.join(differing)} differ, see How measured): "
                "compare their numbers with care"
            )
    return notes


def _method_lines(info: Mapping[str, Any]) -> list[str]:
    lines = []
    if "refusal_detector" in info:
        lines.append(f"- Refusal detector: `{info['refusal_detector']}` (keyword ASR: no refusal phrase found)")
    if "judge" in info:
        threshold = info.get("judge_threshold")
        at = f", harmful at score >= {threshold}" if threshold is not None else ""
        shared = " — **also a training-time critic**" if info.get("judge_shares_training_critic") else ""
        lines.append(f"- Harm judge: `{info['judge']}`{at}{shared}")
    if "risk_judge" in info:
        lines.append(f"- Risk judge (prompt AUROC): `{info['risk_judge']}`")
    generation = info.get("generation")
    if isinstance(generation, Mapping):
        settings = ", ".join(f"{key}={_short(value)}" for key, value in generation.items() if value is not None)
        lines.append(f"- Generation: {settings}")
    sizes = info.get("sizes")
    if isinstance(sizes, Mapping):
        lines.append("- Prompts: " + ", ".join(f"{key} {value}" for key, value in sizes.items()))
    for key, value in info.items():
        if key not in _METHOD_KEYS and key != "warnings":
            lines.append(f"- {key}: {_dumps(value)}")
    return lines


def _examples(results: dict[str, EvaluationResult]) -> list[str]:
    parts: list[str] = []
    for label, result in results.items():
        rows = result.samples.get("harmful") or []
        if not rows:
            continue
        # Answered prompts first: they are what a reviewer needs to read.
        chosen = sorted(rows, key=lambda row: bool(row.get("refused")))[:EXAMPLES_PER_LABEL]
        parts += [f"### {_one_line(label)}", ""]
        for row in chosen:
            verdict = "refused" if row.get("refused") else "answered"
            if "judged_harmful" in row:
                verdict += ", judge: " + ("harmful" if row["judged_harmful"] else "not harmful")
            if row.get("category") is not None:
                verdict += f", category: {row['category']}"
            parts += [
                f"- Prompt ({verdict}):",
                "",
                *_code_block(_truncate(str(row.get("prompt", "")))),
                "",
                "  Response:",
                "",
                *_code_block(_truncate(str(row.get("response", "")))),
                "",
            ]
    return parts


def _truncate(text: str, limit: int = EXAMPLE_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " […]"


def _code_block(text: str) -> list[str]:
    """``text`` as an indented fenced block; the fence outgrows any backtick run so the text cannot end it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"  {fence}text", *(f"  {line}" for line in text.splitlines() or [""]), f"  {fence}"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _escape_cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a setting, or its length where it is long (a chat template would swamp the line)."""
    text = repr(value)
    return text if len(text) <= limit else f"<{len(str(value))} chars>"


def _format_score(value: float | None) -> str:
    if value is None:
        return "—"
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def _ordered_metrics(results: Mapping[str, EvaluationResult]) -> list[str]:
    """Rate names over all labels: overall ones first, then each one's categories (sorted)."""
    names = list(dict.fromkeys(name for result in results.values() for name in result.rates))
    present = set(names)
    # A category metric is "<parent>/<category>" where <parent> is itself a metric; utility/<task>
    # is overall because "utility" is not.
    parent = {name: next((p for p in present if name.startswith(p + "/")), None) for name in names}
    overall = [name for name in names if parent[name] is None]
    overall.sort(key=lambda n: (_OVERALL_ORDER.index(n) if n in _OVERALL_ORDER else len(_OVERALL_ORDER),
                                n.startswith("utility/"), names.index(n)))
    ordered = list(overall)
    for head in overall:
        ordered += sorted(name for name in names if parent[name] == head)
    # Nested categories whose parent is itself a category (unlikely) still appear, at the end.
    ordered += [name for name in names if name not in ordered]
    return ordered


def _ordered_scores(results: Mapping[str, EvaluationResult]) -> list[str]:
    return list(dict.fromkeys(name for result in results.values() for name in result.scores))


def _categories(results: Mapping[str, EvaluationResult], prefix: str) -> list[str]:
    return sorted(
        {name[len(prefix) + 1:] for result in results.values() for name in result.rates if name.startswith(prefix + "/")}
    )


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

Series = tuple[str, Sequence["RateReport | None"]]


def _write_plots(folder: Path, results: dict[str, EvaluationResult]) -> list[str]:
    labels = list(results)
    written: list[str] = []

    def rates(name: str) -> list[RateReport | None]:
        return [results[label].rates.get(name) for label in labels]

    def measured(name: str) -> bool:
        return any(results[label].rates.get(name) is not None for label in labels)

    series: list[Series] = [(title, rates(name)) for name, title in
                            (("safety/asr", "keyword ASR"), ("safety/asr_judge", "judge ASR")) if measured(name)]
    if series:
        _bar_chart(folder / "asr.png", "Attack success rate (lower is safer)", labels, series)
        written.append("asr.png")
    categories = _categories(results, "safety/asr")
    if categories:
        _bar_chart(folder / "asr_by_category.png", "Keyword ASR by category (lower is safer)", categories,
                   [(label, [results[label].rates.get(f"safety/asr/{c}") for c in categories]) for label in labels])
        written.append("asr_by_category.png")
    if measured("safety/over_refusal"):
        groups = ["all", *_categories(results, "safety/over_refusal")]
        names = ["safety/over_refusal", *(f"safety/over_refusal/{c}" for c in groups[1:])]
        _bar_chart(folder / "over_refusal.png", "Over-refusal of safe prompts (lower is better)", groups,
                   [(label, [results[label].rates.get(name) for name in names]) for label in labels])
        written.append("over_refusal.png")
    tasks = [name for name in _ordered_metrics(results) if name.startswith("utility/")]
    if tasks:
        _bar_chart(folder / "utility.png", "Utility (higher is better)", [t.removeprefix("utility/") for t in tasks],
                   [(label, [results[label].rates.get(task) for task in tasks]) for label in labels])
        written.append("utility.png")
    return written


def _bar_chart(path: Path, title: str, groups: Sequence[str], series: Sequence[Series]) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series, Wilson 95% error bars, in percent."""
    # Figure + Agg canvas instead of pyplot: no global backend switch, no display, nothing left open
    # in pyplot's registry (the figure is freed with its last reference).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = len(groups) * len(series)
    figure = Figure(figsize=(min(18.0, max(6.0, 2.5 + 0.45 * bars)), 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    annotate = bars <= 40
    for j, (name, reports) in enumerate(series):
        xs, heights, below, above = [], [], [], []
        for i, report in enumerate(reports):
            x = i - 0.4 + width * (j + 0.5)
            if report is None:
                continue
            if report.total == 0 or not math.isfinite(report.rate):
                axes.text(x, 1, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
                continue
            rate = 100 * report.rate
            xs.append(x)
            heights.append(rate)
            # max(0, ...): the Wilson interval contains the rate, but float rounding can put it a hair outside.
            below.append(max(0.0, rate - 100 * report.low))
            above.append(max(0.0, 100 * report.high - rate))
            if annotate:
                axes.text(x, 100 * report.high + 1.5, f"{report.count}/{report.total}", ha="center", va="bottom",
                          fontsize=7)
        # An empty bar() still registers the legend entry, so every series is named.
        axes.bar(xs, heights, width * 0.95, yerr=[below, above], capsize=3, label=name, color=f"C{j}",
                 error_kw={"elinewidth": 1})
    axes.set_xticks(range(len(groups)))
    axes.set_xlim(-0.5, len(groups) - 0.5)  # fixed: autoscaling would drop groups whose bars are all missing
    rotate = len(groups) > 4 or any(len(g) > 12 for g in groups)
    axes.set_xticklabels(groups, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    axes.set_ylim(0, 112)
    axes.set_ylabel("% (Wilson 95% interval)")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 100%
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
