#!/usr/bin/env bash
# The prepared GPU check: one command on a lent H100/H200 (the image's own torch and Triton),
# <= 8 minutes, JSON to one file. megatron-core travels as a wheel:
#   here:   make gpu-wheels                      (downloads it into wheels/, git-ignored)
#   device: run(command="bash bench/gpu_check.sh", carry=["wheels"])   -> $OUT/gpu_check.json
#           bash bench/gpu_check.sh FILE --profile   runs bench/gpu_profile.py instead
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_FILE=${1:-${OUT:-/tmp}/gpu_check.json}
SITE=$(mktemp -d)
if compgen -G "wheels/megatron_core-*.whl" >/dev/null; then
    python3 -m pip install -q --no-deps --no-index --ignore-requires-python --target "$SITE" wheels/megatron_core-*.whl
else
    echo "note: no wheels/megatron_core-*.whl (make gpu-wheels); using an installed megatron-core if any" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
script=bench/gpu_check.py
if [ "${2:-}" = "--profile" ]; then  # bench/gpu_profile.py: where native spends its time
    script=bench/gpu_profile.py
    set -- "$1"
fi
timeout 470 python3 "$script" --out "$OUT_FILE" "${@:2}"
