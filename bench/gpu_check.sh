#!/usr/bin/env bash
# The GPU check: one command on a lent H100/H200 (the image's own torch and Triton), <= 7 minutes,
# every phase under its own timeout, one JSON (docs/gpu-check.md). megatron-core travels as a wheel:
#   here:   make gpu-wheels                       (downloads it into wheels/, git-ignored)
#   device: run(command="bash bench/gpu_check.sh", carry=["wheels"])
#           -> $OUT/gpu_check_<date>.json and $OUT/gpu_check_logs.tar.gz
#
#   bash bench/gpu_check.sh [FILE] [gpu_check_run.py options]   the whole check (FILE: the JSON)
#   bash bench/gpu_check.sh [FILE] --dry                         CPU, gloo, tiny widths (what CI runs)
#   bash bench/gpu_check.sh FILE --profile                       bench/gpu_profile.py instead
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y-%m-%d)
OUT_FILE=""
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
    OUT_FILE=$1
    shift
fi
DRY=0
PROFILE=0
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dry) DRY=1 ;;
        --profile) PROFILE=1 ;;
        *) ARGS+=("$arg") ;;
    esac
done
if [ -z "$OUT_FILE" ]; then
    if [ "$DRY" = 1 ]; then OUT_FILE=${TMPDIR:-/tmp}/gpu_check_dry.json; else OUT_FILE=${OUT:-bench/results}/gpu_check_$STAMP.json; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 0 ]; then
    SITE=$(mktemp -d)
    if compgen -G "wheels/megatron_core-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-deps --no-index --ignore-requires-python --target "$SITE" wheels/megatron_core-*.whl
        export PYTHONPATH="$SITE:$PYTHONPATH"
    else
        echo "note: no wheels/megatron_core-*.whl (make gpu-wheels); using an installed megatron-core if any" >&2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
if [ "$PROFILE" = 1 ]; then  # bench/gpu_profile.py: where native spends its time
    exec timeout 470 "$PY" bench/gpu_profile.py --out "$OUT_FILE" "${ARGS[@]}"
fi
DRY_ARG=()
[ "$DRY" = 1 ] && DRY_ARG=(--dry)
# the run keeps its own 7-minute budget; this outer limit only catches a wedged orchestrator
exec timeout 480 "$PY" bench/gpu_check_run.py --out "$OUT_FILE" --logs "$(dirname "$OUT_FILE")/gpu_check_logs.tar.gz" \
    "${DRY_ARG[@]}" "${ARGS[@]}"
