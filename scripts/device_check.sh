#!/usr/bin/env bash
# The benchmarks (a)-(c) and the step profile on a lent GPU: resnet18 and tf_efficientnet_lite0 at 224 px,
# batch 128, bf16 autocast, channels_last. Prints nvidia-smi, then the table (benchmarks/README.md).
# The benchmark itself is bounded by `timeout 280`; the whole script ends within 5 minutes.
#
# Creates nothing outside the repository: temporary files, packages installed from carried wheels and the
# JSON report go to benchmarks/.cache/ (git-ignored); the JSON is also copied to $OUT when the device tool
# sets it.
#
# A fresh GPU machine has its own python3 with CUDA torch, timm, numpy, pandas, scikit-learn, PyYAML and
# safetensors, but not pydantic (read by medmerge.config). The repo's .venv (Python 3.11, 6.4 GB) cannot
# travel there, so the missing packages travel as Python 3.12 wheels:
#
#   bash scripts/device_check.sh --prepare-wheels      # here, once: wheels into benchmarks/.cache/wheels
#   then, through the device tool, from the repository root:
#   run(command="bash scripts/device_check.sh", carry=["benchmarks/.cache/wheels"], timeout_s=330)
#
# Extra arguments go to benchmarks/run.py after the GPU defaults (later ones win), and PYTHON picks the
# interpreter, e.g. a CPU dry run here: PYTHON=.venv/bin/python bash scripts/device_check.sh --device cpu
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
CACHE="$PWD/benchmarks/.cache"
WHEELS="$CACHE/wheels"
PACKAGES="pydantic pydantic_core annotated_types typing_inspection typing_extensions"

if [ "${1:-}" = "--prepare-wheels" ]; then
    # The versions installed in this checkout's .venv, built for the GPU image's CPython 3.12 on x86-64.
    VENV_PY="${PYTHON:-.venv/bin/python}"
    mkdir -p "$WHEELS"
    for name in $PACKAGES; do
        version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || exit 1
        "$VENV_PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$name==$version" || exit 1
    done
    ls -la "$WHEELS"
    exit 0
fi

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi not available)"

mkdir -p "$CACHE/tmp"
export TMPDIR="$CACHE/tmp" MPLCONFIGDIR="$CACHE/matplotlib" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The interpreter: $PYTHON if given, else the repo's .venv if it runs CUDA torch here, else the image's python3.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    PY=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
        >/dev/null 2>&1; then
        PY=.venv/bin/python
    fi
fi
NEEDED="import torch, timm, numpy, pandas, sklearn, yaml, safetensors, PIL, tqdm, pydantic"
if ! "$PY" -c "$NEEDED" >/dev/null 2>&1; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "== installing carried wheels into benchmarks/.cache/site"
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$CACHE/site" "$WHEELS"/*.whl || exit 3
        export PYTHONPATH="$PYTHONPATH:$CACHE/site"
    fi
fi
if ! "$PY" -c "$NEEDED"; then
    echo "missing packages for $PY; run 'bash scripts/device_check.sh --prepare-wheels' here and carry" \
         "benchmarks/.cache/wheels" >&2
    exit 3
fi
echo "== $("$PY" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")"

echo "== benchmark (a)-(c) + profile"
timeout 280 "$PY" benchmarks/run.py --parts abc --device cuda --size 224 --batch 128 --mixed-precision bf16 \
    --channels-last on --repeats 10 --memory-repeats 2 --profile --json "$CACHE/device_check.json" "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "benchmark stopped by timeout 280" >&2
fi
if [ -n "${OUT:-}" ] && [ -f "$CACHE/device_check.json" ]; then
    cp "$CACHE/device_check.json" "$OUT/"
fi
exit "$rc"
