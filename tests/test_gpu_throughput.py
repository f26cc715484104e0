"""benchmarks/gpu_throughput.py, the Python part of benchmarks/gpu_check.sh, runs on CPU on the tiny model.

The GPU check itself needs a CUDA device; these runs prove the script's two modes work end to end
(LoRA throughput with MFU from an explicit peak, and FSDP2 on one device with the reference sharded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_throughput.py"


def run(tmp_path: Path, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--peak-tflops", "2", "--out-dir", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mode = extra[1] if extra else "throughput"
    assert (tmp_path / f"{mode}.md").read_text() in done.stdout
    return json.loads((tmp_path / f"{mode}.json").read_text())


def test_throughput_quick_on_cpu(tmp_path):
    result = run(tmp_path)
    assert result["ok"] and result["peak_flops"] == 2e12
    assert result["reference_rows_counted"] == result["reference_rows_expected"] == 3 * (0 + 4 + 1)  # 3 rounds of 4-row steps
    tokens, params = result["tokens_per_step"], result["flop_parameters"]
    assert tokens == 4 * 32 and params > 0
    for name in ("sft", "adaptive_all", "adaptive_25"):
        entry = result["configs"][name]
        assert len(entry["times"]) == 2
        assert entry["tokens_per_s"] == pytest.approx(tokens / entry["median"])
        assert entry["mfu"] == pytest.approx(6 * params * entry["tokens_per_s"] / 2e12)
        assert entry["peak_memory"] is None  # CUDA only
    assert result["configs"]["adaptive_all"]["expected_reference_rows"] == 4


def test_fsdp2_quick_on_cpu_shards_the_reference(tmp_path):
    result = run(tmp_path, "--mode", "fsdp2")
    assert result["ok"] and result["sharded"] == {"policy": True, "reference": True}
    assert result["reference_rows_counted"] == result["reference_rows_expected"] == 3 * 4
    assert len(result["times"]) == 2 and len(result["losses"]) == 3 and result["mfu"] > 0


def test_peak_flops_table_prefers_the_specific_name():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_throughput import table_peak_tflops
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert table_peak_tflops("NVIDIA H100 80GB HBM3") == ("H100", 989.4)
    assert table_peak_tflops("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert table_peak_tflops("NVIDIA H100 NVL") == ("H100 NVL", 835.0)
    assert table_peak_tflops("NVIDIA H200") == ("H200", 989.4)
    assert table_peak_tflops("NVIDIA GH200 480GB") == ("GH200", 989.4)
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert table_peak_tflops("Tesla T4") is None
