#!/usr/bin/env bash
# Device call: the tiny-engine checks of device_tiny.sh, then the decode kernel benchmarks.
# Usage: bash bench/device_tiny2.sh h200 $OUT
set -u
bash "$(dirname "$0")/device_tiny.sh" "$@"
python3 bench/decode_kernels.py --out "${2:?out dir}" 2>&1 | tee "$2/decode_kernels.log" | grep -v "^skip"
