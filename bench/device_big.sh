#!/usr/bin/env bash
# Device call (issue 7): 35B-A3B full geometry, all 40 layers, FP8 (write, build, load, generate, bench,
# per-layer times, decode profile) and 397B-A17B full geometry, one layer of each kind, FP8 (per-layer
# prefill/decode times). Built side by side; timed one after the other (--run-after).
# Usage (on the device, repo root): bash bench/device_big.sh h200 $OUT
set -u
TARGET=${1:-h200}; OUT=${2:?out dir}
export PYTHONUNBUFFERED=1
rm -f /tmp/b397.done
python3 bench/device_big.py --out "$OUT" --preset 397b-a17b --layers 2 --layer-types linear_attention,full_attention \
  --dtype fp8 --target "$TARGET" --ckpt /tmp/b397_ckpt --engine /dev/shm/b397_engine --tag _2layers --quick \
  --done-flag /tmp/b397.done > /tmp/b397.log 2>&1 &
python3 bench/device_big.py --out "$OUT" --preset 35b-a3b --dtype fp8 --target "$TARGET" --tag _40layers \
  --run-after /tmp/b397.done > /tmp/b35.log 2>&1
wait
grep -h "^checkpoint\|^build\|^batch\|rror" /tmp/b397.log /tmp/b35.log | cut -c1-600
python3 - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/big_*.json")):
    r = json.load(open(f)).get("run", {})
    for row in r.get("layers", []):
        print(f.split("/")[-1], row)
PY
