#!/usr/bin/env bash
# One command for a short GPU lease: install, then correctness on CUDA, then the loss, model and
# weight-transport benchmarks, then the rest of `make test-gpu`'s tests, in that order (most
# important first).  Each stage runs under its own time cap and writes its output to its own file
# as it goes; summary.md gets a row as each stage ends.  A stage that fails or hangs costs only
# itself, and the whole run stays inside GPU_CHECK_BUDGET_S.
#
#   bash tools/gpu_check.sh                       # on the lent GPU machine: files go to $OUT
#   GPU_PYTHON=.venv-gpu-twin/bin/python GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh   # CPU rehearsal
#
# Settings (environment): GPU_PYTHON (python3), GPU_CHECK_DEVICE (auto|cuda|cpu), GPU_CHECK_OUT
# (default $OUT, else outputs/gpu-check), WHEELS (.whl), GPU_SITE (/tmp/eopd-gpu-site),
# GPU_CHECK_BUDGET_S (540), GPU_CHECK_CAP_<STAGE> in seconds (STAGE as in STAGES, upper case, - as _),
# GPU_CHECK_CAP_SCALE (multiplies the default caps and budget; default 1 on CUDA, 4 on CPU, whose paths
# run slower on two shared cores), GPU_CHECK_STAGES (a subset, e.g. "install bench-model"), GPU_TESTS
# (default: the Makefile's list), GPU_CHECK_WORLD_SIZE (default: the GPU count, or 1 on CPU as on a
# one-GPU lease), GPU_CHECK_BENCH_{LOSS,MODEL,TRANSPORT}_ARGS (appended to that benchmark's arguments).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

STAGES=(install correctness bench-loss bench-model bench-transport tests-rest)
# Seconds on CUDA; they sum to 530, and the 540 s budget holds the whole run, kill grace included, inside
# 9 minutes.  Correctness and the model benchmark get the most; the rest of the tests whatever fits.
declare -A DEFAULT_CAP=([install]=40 [correctness]=180 [bench-loss]=60 [bench-model]=145
                        [bench-transport]=55 [tests-rest]=50)
declare -A FILE_OF=([install]=1-install.txt [correctness]=2-correctness.txt [bench-loss]=3-bench-loss.txt
                    [bench-model]=4-bench-model.txt [bench-transport]=5-bench-transport.txt
                    [tests-rest]=6-tests-rest.txt)
KILL_GRACE_S=10

# Correctness on the device: model build and logits vs transformers (multirank tp1pp1 checks and the
# converter round trips, NCCL at one rank per GPU), the Triton loss kernels and the fused output layer
# against the torch path at V = 151,936, SDPA attention, the RoPE kernel.  Node ids, so that the
# tests-rest stage can --deselect exactly these.
CORRECTNESS_TESTS=(
    tests/test_gpu_path_rules.py
    tests/test_triton_kernels.py::test_parent_cuda_kernels_match_torch_path
    tests/test_triton_kernels.py::test_parent_cuda_rope_and_fused_head
    tests/test_qwen3_multirank.py
    tests/test_attention_sdpa.py
    tests/test_platform.py
    tests/test_convert_tools.py::test_round_trip_is_bit_identical_and_loads_in_transformers
    tests/test_convert_tools.py::test_bf16_conversion_and_dtype_override
    tests/test_triton_kernels.py::test_parent_compiles_the_kernels_for_hopper
)

export PYTHONUNBUFFERED=1
# A path to the interpreter made absolute (the install stage checks its imports from another directory);
# a bare name is left to PATH.
absolute() {
    case $1 in
        /*) echo "$1" ;;
        */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;;
        *) echo "$1" ;;
    esac
}
PY=$(absolute "${GPU_PYTHON:-python3}")
WHEELS=${WHEELS:-.whl}
SITE=${GPU_SITE:-/tmp/eopd-gpu-site}
case $SITE in /*) ;; *) SITE=$REPO/$SITE ;; esac
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-outputs/gpu-check}}

gpu_tests_from_makefile() {
    # The Makefile's GPU_TESTS (continuation lines joined), so the list lives in one place.
    "$PY" - <<'EOF'
import re
text = open("Makefile").read().replace("\\\n", " ")
match = re.search(r"^GPU_TESTS \?=(.*)$", text, re.M)
print(" ".join(match.group(1).split()) if match else "")
EOF
}

# ------------------------------------------------------------------------------------------ stages
stage_install() {
    set -e
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__)"
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE")
    "${pip[@]}" "$WHEELS"/megatron_core-*.whl
    # pip builds the project in the checkout; a build/ left from an earlier run could add stale modules.
    rm -rf build
    "${pip[@]}" --no-build-isolation .
    rm -rf build
    # From another directory, so that the imports below come from $SITE and not from the checkout.
    (cd / && PYTHONPATH="$SITE" "$PY" - <<'EOF'
import importlib.metadata as md, sys, time
import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"

start = time.perf_counter()
import megatron.core, megatron_eopd  # noqa: E401,F401  the wheel must import with this torch
print(f"megatron.core imported in {time.perf_counter() - start:.1f} s from {megatron.core.__file__}")
print(f"megatron_eopd from {megatron_eopd.__file__}")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"versions: python {sys.version.split()[0]} | torch {torch.__version__} | triton {version('triton')} | "
      f"transformers {version('transformers')} | megatron-core {version('megatron-core')} | {gpu}")
EOF
    )
}

run_pytest() {
    PYTHONPATH="$SITE" EOPD_MULTIRANK_DEVICE="$DEVICE" EOPD_MULTIRANK_WORLD_SIZE="$WORLD_SIZE" \
        "$PY" -m pytest -v -rfEs -p no:cacheprovider -k "not modelopt" "$@"
}

stage_correctness() {
    run_pytest "${CORRECTNESS_TESTS[@]}"
}

stage_bench_loss() {
    local args
    if [ "$DEVICE" = cuda ]; then
        args=(--device cuda --tokens 16384 --kernels "torch,triton" --repeats 3)
    else
        args=(--quick)
    fi
    # shellcheck disable=SC2086  # word splitting of the override is wanted
    PYTHONPATH="$SITE" "$PY" tools/bench_loss.py "${args[@]}" ${GPU_CHECK_BENCH_LOSS_ARGS:-}
}

stage_bench_model() {
    local args
    if [ "$DEVICE" = cuda ]; then
        args=(--device cuda --models "0.6b,1.7b" --teacher 8b --seq 4096 --micro-batches 1 --repeats 3
              --warmup 1)
    else
        args=(--quick)
    fi
    # shellcheck disable=SC2086
    PYTHONPATH="$SITE" "$PY" tools/bench_model.py "${args[@]}" ${GPU_CHECK_BENCH_MODEL_ARGS:-}
}

stage_bench_transport() {
    local args
    if [ "$DEVICE" = cuda ]; then
        args=(--device cuda --models "0.6b,4b" --repeats 2)
    else
        args=(--device cpu --models tiny --repeats 1)
    fi
    # shellcheck disable=SC2086
    PYTHONPATH="$SITE" "$PY" tools/bench_weight_transport.py "${args[@]}" ${GPU_CHECK_BENCH_TRANSPORT_ARGS:-}
}

stage_tests_rest() {
    local tests deselect node
    tests=${GPU_TESTS:-$(gpu_tests_from_makefile)}
    deselect=()
    for node in "${CORRECTNESS_TESTS[@]}"; do deselect+=(--deselect "$node"); done
    # shellcheck disable=SC2086
    run_pytest $tests "${deselect[@]}"
}

# A stage runs as a fresh bash process (so that `timeout` can signal it and everything it started).
if [ "${1:-}" = __stage ]; then
    "stage_${2//-/_}"
    exit $?
fi

# ------------------------------------------------------------------------------------------- driver
# nvidia-smi rather than torch, to spare an import of torch (seconds) before the first stage.
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ')
if [ "${GPU_CHECK_DEVICE:-auto}" = auto ]; then
    if [ "$gpus" -gt 0 ]; then DEVICE=cuda; else DEVICE=cpu; fi
else
    DEVICE=$GPU_CHECK_DEVICE
fi
if [ -n "${GPU_CHECK_WORLD_SIZE:-}" ]; then
    WORLD_SIZE=$GPU_CHECK_WORLD_SIZE
elif [ "$DEVICE" = cuda ]; then
    WORLD_SIZE=$gpus  # one rank per GPU
else
    WORLD_SIZE=1  # as on the one-GPU lease
fi
export DEVICE WORLD_SIZE PY WHEELS SITE
if [ "$DEVICE" = cuda ]; then SCALE=${GPU_CHECK_CAP_SCALE:-1}; else SCALE=${GPU_CHECK_CAP_SCALE:-4}; fi

scaled() { awk -v s="$1" -v f="$SCALE" 'BEGIN { printf "%d", s * f }'; }
BUDGET_S=${GPU_CHECK_BUDGET_S:-$(scaled 540)}  # seconds given explicitly are not scaled
SELECTED=" ${GPU_CHECK_STAGES:-${STAGES[*]}} "
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
# A stage left out this time must not show an earlier run's file.
for stage in "${STAGES[@]}"; do rm -f "$OUT_DIR/${FILE_OF[$stage]}"; done
START=$SECONDS
ROWS=()

write_summary() {
    {
        echo "# gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo
        echo "device $DEVICE, world size $WORLD_SIZE, cap scale $SCALE"
        echo
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); python $PY"
        grep -h '^versions:' "$OUT_DIR/${FILE_OF[install]}" 2>/dev/null || true
        if command -v nvidia-smi >/dev/null; then
            echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
                                --format=csv,noheader | head -n 1)"
        fi
        echo
        echo "| stage | status | seconds | cap s | result | file |"
        echo "| --- | --- | --- | --- | --- | --- |"
        printf '%s\n' "${ROWS[@]}"
        echo
        echo "total $((SECONDS - START)) s of a $BUDGET_S s budget"
    } > "$SUMMARY"
}

# The last line that says how a pytest run or a benchmark ended, for the summary's result column.
result_line() {
    local file=$1
    local line
    line=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$' "$file" \
           | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    # else the exception a Python traceback ended with, or argparse's complaint
    [ -n "$line" ] || line=$(grep -E '^[A-Za-z_.]*(Error|Exception|Interrupt)(:|$)|: error: ' "$file" \
                             | tail -n 1 | cut -c1-160)
    echo "${line//|/\\|}"
}

# Big logs would not come back from the lease (16 MiB a file): keep the head and the tail.
trim_file() {
    local file=$1 limit=$((15 * 1024 * 1024))
    if [ "$(stat -c %s "$file")" -gt "$limit" ]; then
        { head -c $((2 * 1024 * 1024)) "$file"; printf '\n[... trimmed ...]\n'
          tail -c $((12 * 1024 * 1024)) "$file"; } > "$file.trim" && mv "$file.trim" "$file"
    fi
}

echo "gpu-check: device $DEVICE, world size $WORLD_SIZE, budget ${BUDGET_S}s, writing to $OUT_DIR"
for stage in "${STAGES[@]}"; do
    case "$SELECTED" in *" $stage "*) ;; *) continue ;; esac
    file="$OUT_DIR/${FILE_OF[$stage]}"
    var="GPU_CHECK_CAP_$(echo "$stage" | tr 'a-z-' 'A-Z_')"
    cap=${!var:-$(scaled "${DEFAULT_CAP[$stage]}")}
    left=$((BUDGET_S - (SECONDS - START) - KILL_GRACE_S))
    [ "$cap" -le "$left" ] || cap=$left
    if [ "$cap" -lt 1 ]; then
        echo "not run: the budget of ${BUDGET_S}s was spent" > "$file"
        ROWS+=("| $stage | skipped: no time left | 0 | 0 | | ${FILE_OF[$stage]} |")
        write_summary
        continue
    fi
    echo "== $stage (cap ${cap}s) -> $file"
    began=$SECONDS
    # SIGINT first: pytest then prints its summary and bench_model its finished rows; KILL after the grace.
    timeout --signal=INT --kill-after="$KILL_GRACE_S" "$cap" bash "$0" __stage "$stage" \
        > "$file" 2>&1 < /dev/null
    rc=$?
    took=$((SECONDS - began))
    case $rc in
        0) status=ok ;;
        124|137) status="timed out at its cap"
                 echo "[gpu-check] stopped at the ${cap}s cap (rc $rc)" >> "$file" ;;
        *) status="failed (rc $rc)" ;;
    esac
    trim_file "$file"
    ROWS+=("| $stage | $status | $took | $cap | $(result_line "$file") | ${FILE_OF[$stage]} |")
    write_summary
    echo "   $status in ${took}s"
done

echo
cat "$SUMMARY"
# The benchmark tables also go to the console, in case the files do not come back.
for stage in bench-loss bench-model bench-transport; do
    file="$OUT_DIR/${FILE_OF[$stage]}"
    [ -f "$file" ] || continue
    echo; echo "--- tail of ${FILE_OF[$stage]}"; tail -n 25 "$file" | cut -c1-220
done
