#!/usr/bin/env bash
# The GPU check on a machine with Python, torch and one CUDA GPU, offline: install difftune from the
# wheels carried in ./wheelhouse, then measure (benchmarks/gpu_check.py) into the folder given.
#   bash benchmarks/gpu_check.sh gpu_check_out [more gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_DIR [flags]}"
shift
exec python benchmarks/gpu_check.py --wheelhouse "${WHEELHOUSE:-wheelhouse}" "$out" "$@"
