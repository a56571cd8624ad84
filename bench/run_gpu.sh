#!/usr/bin/env bash
# Every GPU check in one call, from the repository root of a machine with a CUDA GPU:
#
#   OUT=/some/dir bash bench/run_gpu.sh
#
#   $OUT/tests.log                   python -m pytest tests -q (the kernel tests, on the GPU)
#   $OUT/bench.log                   the benchmark run's console output
#   $OUT/bench-<device>-<date>.json  pytest-benchmark's JSON (timings + extra_info of every row)
#   $OUT/summary.md                  bench/summary.py's Markdown table of that JSON
#   $OUT/meta.txt                    device, date, git revision, versions
#
# A failing step does not stop the next; the exit status is nonzero if any failed.
# To split the work over several shorter commands (e.g. under a job time limit):
#   SFPO_GPU_STEPS="tests"   (or "bench", default "tests bench") picks the steps;
#   SFPO_BENCH_K="reposition or snapshot" passes `-k` to the benchmark run.
# Without a .git directory, set SFPO_GIT_REV to the revision the tree was copied from.
# PYTHON picks the interpreter (default: python3, else python).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
: "${OUT:?set OUT to the directory the results go to}"
mkdir -p "$OUT" || exit 2

PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels, never the interpreter, on the GPU

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "run_gpu.sh: torch sees no CUDA device; this script is for a GPU machine" >&2
    exit 2
fi

device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[ -n "$device" ] || device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
slug=$(printf '%s' "$device" | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9][^a-z0-9]*/-/g' -e 's/^-//' -e 's/-$//')
stamp=$(date -u +%Y%m%d-%H%M%S)
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
    [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || rev="$rev-dirty"
else
    rev=${SFPO_GIT_REV:-unknown}
fi
export SFPO_GIT_REV="$rev"  # bench/conftest.py falls back to it when git is missing

{
    echo "device: $device"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git_rev: $rev"
    "$PY" -c 'import platform, torch, triton
print("python:", platform.python_version())
print("torch:", torch.__version__, "(cuda", str(torch.version.cuda) + ")")
print("triton:", triton.__version__)'
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
} >"$OUT/meta.txt" 2>&1

failed=()

steps=" ${SFPO_GPU_STEPS:-tests bench} "

if [[ $steps == *" tests "* ]]; then
    echo "== kernel tests ($device)"
    "$PY" -m pytest tests -q 2>&1 | tee "$OUT/tests.log" || failed+=("tests")
fi

if [[ $steps == *" bench "* ]]; then
    json="$OUT/bench-$slug-$stamp.json"
    echo "== benchmarks ${SFPO_BENCH_K:+(-k $SFPO_BENCH_K) }-> $json"
    "$PY" -m pytest bench/ --benchmark-only --benchmark-json="$json" ${SFPO_BENCH_K:+-k "$SFPO_BENCH_K"} 2>&1 \
        | tee "$OUT/bench.log" || failed+=("bench")
    if [ -s "$json" ]; then
        "$PY" bench/summary.py "$json" -o "$OUT/summary.md" && cat "$OUT/summary.md" || failed+=("summary")
    else
        failed+=("summary (no benchmark JSON)")
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$OUT/meta.txt"
    exit 1
fi
echo "all passed" | tee -a "$OUT/meta.txt"
