#!/usr/bin/env bash
# Device call: tiny BF16/FP8 engines (checks + validate) and a 4-layer 35B-A3B-geometry FP8 engine (bench),
# built side by side. Usage: bash bench/device_final.sh h200 $OUT
set -u
TARGET=${1:-h100}; OUT=${2:?out dir}
export PYTHONUNBUFFERED=1
mkdir -p /tmp/val
( python3 bench/device_engine.py --out "$OUT" --target "$TARGET" --dtypes bf16 --work /tmp/q35_bf16 --tag _bf16 > "$OUT/bf16.log" 2>&1
  python3 -m qwen35_export.cli validate /tmp/q35_bf16/eng_bf16 --checkpoint /tmp/q35_bf16/tiny_bf16 --reference ours \
    --random 3 --gen 64 --report /tmp/val/bf16_ours > /tmp/val/bf16_ours.log 2>&1 ) &
( python3 bench/device_engine.py --out "$OUT" --target "$TARGET" --dtypes fp8 --work /tmp/q35_fp8 --tag _fp8 > "$OUT/fp8.log" 2>&1
  python3 -m qwen35_export.cli validate /tmp/q35_fp8/eng_fp8 --checkpoint /tmp/q35_fp8/tiny_fp8 --reference transformers \
    --random 3 --gen 64 --report /tmp/val/fp8_transformers > /tmp/val/fp8_transformers.log 2>&1 ) &
python3 bench/device_big.py --out "$OUT" --preset 35b-a3b --layers 4 --dtype fp8 --target "$TARGET" > "$OUT/big4.log" 2>&1 &
wait
for f in /tmp/val/*.log; do echo "== $f"; grep -A20 "^check" "$f" | grep -v "^report"; done
tar czf "$OUT/validate.tgz" -C /tmp val
grep -h "^bf16\|^fp8\|FAILED" "$OUT"/bf16.log "$OUT"/fp8.log | cut -c1-700
grep -h "^batch\|^build\|Error" "$OUT"/big4.log | cut -c1-400
