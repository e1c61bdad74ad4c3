#!/usr/bin/env bash
# The GPU check: the benchmark suite (step_time, loader_throughput, peak_memory, step_profile) for resnet18
# and tf_efficientnet_lite0 at 224 px, batch 128, bf16 autocast and channels_last, then every merge method
# once on the GPU (scripts/gpu_methods_check.py). Prints nvidia-smi and the table that
# benchmarks/README.md records.
#
#   bash scripts/device_check.sh                    # on a machine with a GPU, from any directory
#   bash scripts/device_check.sh results/           # also copy the JSON report into results/
#   bash scripts/device_check.sh results/ --repeats 20 --arch resnet18   # extra arguments go to the suite
#
# Needs the project's dependencies (`make install`, or `pip install -e .` into an environment with CUDA torch).
# The interpreter is $PYTHON if set, else .venv/bin/python if it sees a GPU, else python3. The benchmark is
# bounded by `timeout 280` and the methods check by `timeout 120`. Temporary files and the JSON report go to
# benchmarks/.cache/ (git-ignored). A dry run on a CPU:
#   bash scripts/device_check.sh --device cpu --mixed-precision none --channels-last off --size 32 --batch 8 --repeats 2
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
CACHE="$PWD/benchmarks/.cache"
OUTPUT=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    OUTPUT="$1"
    shift
    mkdir -p "$OUTPUT" || exit 2
fi

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi not available)"

mkdir -p "$CACHE/tmp"
export TMPDIR="$CACHE/tmp" MPLCONFIGDIR="$CACHE/matplotlib" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    PY=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
        >/dev/null 2>&1; then
        PY=.venv/bin/python
    fi
fi
if ! "$PY" -c "import torch, timm, numpy, pandas, sklearn, yaml, safetensors, PIL, tqdm, pydantic"; then
    echo "$PY lacks the project's dependencies: run 'make install' (or pip install -e .) first" >&2
    exit 3
fi
echo "== $("$PY" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")"

DEVICE=cuda
for arg in "$@"; do  # a dry run on the CPU asks for it with --device cpu
    [ "${previous:-}" = "--device" ] && DEVICE="$arg"
    previous="$arg"
done

echo "== benchmark suite: step_time, loader_throughput, peak_memory, step_profile"
timeout 280 "$PY" -m benchmarks suite --measure step_time loader_throughput peak_memory step_profile \
    --device cuda --size 224 --batch 128 --mixed-precision bf16 --channels-last on --repeats 10 --memory-repeats 2 \
    --json "$CACHE/device_check.json" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "benchmark stopped by timeout 280" >&2

SIZE=224
[ "$DEVICE" = cpu ] && SIZE=32
echo "== every merge method on $DEVICE ($SIZE px)"
timeout 120 "$PY" scripts/gpu_methods_check.py --size "$SIZE" --device "$DEVICE"
methods_rc=$?
[ "$methods_rc" -eq 124 ] && echo "methods check stopped by timeout 120" >&2

if [ -n "$OUTPUT" ] && [ -f "$CACHE/device_check.json" ]; then
    cp "$CACHE/device_check.json" "$OUTPUT/" && echo "saved $OUTPUT/device_check.json"
fi
[ "$rc" -ne 0 ] && exit "$rc"
exit "$methods_rc"
