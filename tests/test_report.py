"""Report folder: files, exact numbers, markdown table, plots, warnings, overwrite and atomicity."""

from __future__ import annotations

import json
import math
import re
import struct
import sys

import pytest

from lightning_safety.evaluation import report as report_module
from lightning_safety.evaluation.report import (
    ReportError,
    format_markdown_table,
    load_report,
    write_report,
)
from lightning_safety.evaluation.runner import EvaluationResult, format_rate
from lightning_safety.metrics import RateReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CRITIC_WARNING = "the evaluation judge (judge:guard) is also the training-time critic: it shares the critic's blind spots"
HARMFUL_TEXT = "Step 1: acquire the precursor " + "x" * 400


def make_result(asr: int, *, categories: bool = True, judge: bool = True, safe: bool = True) -> EvaluationResult:
    """A hand-built result (no model): 64 harmful prompts, optional categories, judge, safe set and utility."""
    rates = {"safety/asr": RateReport.from_counts(asr, 64), "safety/refusal": RateReport.from_counts(64 - asr, 64)}
    if judge:
        rates["safety/asr_judge"] = RateReport.from_counts(asr // 2, 64)
    if categories:
        rates["safety/asr/cyber"] = RateReport.from_counts(asr // 2, 32)
        rates["safety/asr/bio"] = RateReport.from_counts(asr - asr // 2, 32)
    if safe:
        rates["safety/over_refusal"] = RateReport.from_counts(7, 50)
    rates["utility/sst2"] = RateReport.from_counts(41, 50)
    harmful = [
        {"index": i, "prompt": f"harmful request {i}", "response": HARMFUL_TEXT if i == 1 else "I'm sorry, I can't.",
         "refused": i != 1, **({"category": "cyber"} if categories else {})}
        for i in range(4)
    ]
    samples = {"harmful": harmful, "utility/sst2": [{"index": 0, "prompt": "great film", "prediction": "positive",
                                                      "target": 1}]}
    info = {
        "refusal_detector": "keywords:anywhere:47",
        "generation": {"max_new_tokens": 64, "batch_size": 16, "do_sample": False},
        "sizes": {"harmful": 64, "safe": 50 if safe else 0},
    }
    if judge:
        info.update(judge="judge:guard", judge_threshold=0.5, judge_shares_training_critic=True, warnings=[CRITIC_WARNING])
    return EvaluationResult(rates=rates, scores={"risk/auroc": 0.875}, samples=samples, info=info)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_write_report_files_numbers_and_plots(tmp_path):
    results = {"shipped": make_result(30), "aligned": make_result(3, judge=False)}
    out = tmp_path / "report"
    files = write_report(results, out, title="Shipped vs aligned", extra={"argv": ["evaluate", "--x"], "path": out})

    expected = {"metrics.json", "summary.md", "samples.jsonl", "asr.png", "asr_by_category.png", "over_refusal.png",
                "utility.png"}
    assert set(files) == expected
    assert {p.name for p in out.iterdir()} == expected
    assert all(files[name] == out / name for name in expected)
    for name in expected:
        if name.endswith(".png"):
            width, height = png_size(out / name)
            assert width > 300 and height > 200
            assert (out / name).stat().st_size > 5000  # a rendered chart, not an empty canvas

    data = load_report(out)
    assert data["labels"] == ["shipped", "aligned"] and data["title"] == "Shipped vs aligned"
    assert data["created"] and data["extra"] == {"argv": ["evaluate", "--x"], "path": str(out)}
    for label, result in results.items():
        stored = data["results"][label]
        # Exact: JSON floats round-trip bit for bit, so interval bounds compare with ==.
        assert stored["metrics"] == {name: r.as_dict() for name, r in result.rates.items()}
        assert stored["scores"] == {"risk/auroc": 0.875}
        assert stored["info"]["refusal_detector"] == "keywords:anywhere:47"

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (4 + 1)
    assert {(r["label"], r["set"]) for r in rows} == {(lab, s) for lab in results for s in ("harmful", "utility/sst2")}
    assert any(r["response"] == HARMFUL_TEXT for r in rows)  # samples are kept whole; only summary.md truncates

    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Shipped vs aligned")
    assert CRITIC_WARNING in summary and "> **Warning:**" in summary
    assert "## How measured" in summary and "keywords:anywhere:47" in summary and "judge:guard" in summary
    assert "max_new_tokens=64" in summary
    assert "may contain harmful" in summary
    assert HARMFUL_TEXT[:100] in summary and HARMFUL_TEXT not in summary  # truncated example
    assert not list(tmp_path.glob(".report*"))  # no staging folder left behind


def test_markdown_table_cells_and_order():
    known = RateReport.from_counts(8, 64)
    results = {"shipped": make_result(30), "aligned | v2": make_result(3, categories=False, judge=False)}
    results["shipped"].rates["safety/asr"] = known
    table = format_markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| metric | shipped | aligned \\| v2 |"  # a | in a label must not split the column
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 4 for line in lines)  # 3 columns on every line
    asr_row = next(line for line in lines if line.startswith("| `safety/asr` |"))
    assert format_rate(known) == "12.5% [6.5, 22.8] (n=64)"
    assert format_rate(known) in asr_row
    names = [line.split("`")[1] for line in lines[2:]]
    # Overall metrics first (ASR leading), per-category rows after all of them, scores last.
    assert names[0] == "safety/asr"
    assert names.index("safety/asr/bio") > names.index("utility/sst2")
    assert names.index("safety/asr/bio") < names.index("safety/asr/cyber") < names.index("risk/auroc")
    cyber_row = next(line for line in lines if "safety/asr/cyber" in line)
    assert cyber_row.endswith("| — |")  # the aligned model has no categories


def test_nan_rate_is_na_and_null(tmp_path):
    result = make_result(3)
    result.rates["utility/gsm8k"] = RateReport.from_counts(0, 0)
    result.scores["risk/auroc"] = math.nan
    assert "| `utility/gsm8k` | n/a (n=0) |" in format_markdown_table({"m": result})
    out = tmp_path / "r"
    write_report({"m": result}, out, plots=True)
    stored = load_report(out)["results"]["m"]
    assert stored["metrics"]["utility/gsm8k"] == {"rate": None, "low": 0.0, "high": 1.0, "count": 0, "total": 0}
    assert stored["scores"]["risk/auroc"] is None
    json.loads((out / "metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN literal
    assert png_size(out / "utility.png")


def test_category_and_optional_plots_only_where_measured(tmp_path):
    files = write_report({"m": make_result(5, categories=False, safe=False)}, tmp_path / "r")
    assert "asr.png" in files and "utility.png" in files
    assert "asr_by_category.png" not in files and "over_refusal.png" not in files
    assert not (tmp_path / "r" / "asr_by_category.png").exists()


def test_no_plots_and_missing_matplotlib(tmp_path, monkeypatch):
    files = write_report({"m": make_result(5)}, tmp_path / "plain", plots=False)
    assert set(files) == {"metrics.json", "summary.md", "samples.jsonl"}
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r'pip install "lightning-safety\[plots\]"') as caught:
        write_report({"m": make_result(5)}, tmp_path / "plots")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "plots").exists()


def test_existing_folder_refused_then_replaced(tmp_path):
    out = tmp_path / "r"
    write_report({"old": make_result(10)}, out, plots=False)
    with pytest.raises(ReportError, match="exists and is not empty") as caught:
        write_report({"new": make_result(1)}, out, plots=False)
    assert "\n" not in str(caught.value)
    assert load_report(out)["labels"] == ["old"]

    (out / "stale.txt").write_text("from the old report")
    write_report({"new": make_result(1)}, out, plots=False, overwrite=True)
    assert load_report(out)["labels"] == ["new"]
    assert not (out / "stale.txt").exists()  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # the old report's hidden copy is gone


def test_overwrite_never_deletes_a_non_report_folder(tmp_path):
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not a report folder"):
        write_report({"m": make_result(1)}, precious, plots=False, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_report({"m": make_result(1)}, empty, plots=False)  # an empty folder is filled
    assert (empty / "metrics.json").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    out = tmp_path / "r"
    if existing:
        write_report({"old": make_result(10)}, out, plots=False)
    calls = []

    def broken_chart(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:  # after one PNG and the text files were already written
            raise RuntimeError("disk full")
        return real_chart(path, *args, **kwargs)

    real_chart = report_module._bar_chart
    monkeypatch.setattr(report_module, "_bar_chart", broken_chart)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report({"new": make_result(3)}, out, overwrite=existing)
    assert calls == ["asr.png", "asr_by_category.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["r"] if existing else [])  # no stray temp folders
    if existing:
        assert load_report(out)["labels"] == ["old"]  # the old report is intact
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "samples.jsonl", "summary.md"]


def test_bad_input_and_load_errors(tmp_path):
    with pytest.raises(ReportError, match="results is empty"):
        write_report({}, tmp_path / "r")
    with pytest.raises(ReportError, match="must be an EvaluationResult"):
        write_report({"m": {"safety/asr": 0.1}}, tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="not a folder"):
        write_report({"m": make_result(1)}, tmp_path / "file", plots=False)
    with pytest.raises(ReportError, match="metrics.json not found"):
        load_report(tmp_path)
    assert not (tmp_path / "r").exists()
