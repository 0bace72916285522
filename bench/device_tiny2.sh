#!/usr/bin/env bash
# Device call: tiny engines (decode attention kernel, CUDA graphs) re-checked, FP8 validated against
# transformers, then the decode kernel benchmarks. Usage: bash bench/device_tiny2.sh h200 $OUT
set -u
TARGET=${1:-h100}; OUT=${2:?out dir}
export PYTHONUNBUFFERED=1
for d in bf16 fp8; do
  python3 bench/device_engine.py --out "$OUT" --target "$TARGET" --dtypes $d --work /tmp/q35_$d --tag _$d \
    > "$OUT/$d.log" 2>&1 &
done
wait
mkdir -p /tmp/val
for d in bf16 fp8; do
  for ref in ours transformers; do
    python3 -m qwen35_export.cli validate /tmp/q35_$d/eng_$d --checkpoint /tmp/q35_$d/tiny_$d --reference $ref \
      --random 3 --gen 64 --report /tmp/val/${d}_$ref > /tmp/val/${d}_$ref.log 2>&1 &
  done
done
wait
for f in /tmp/val/*.log; do echo "== $f"; grep -A20 "^check" "$f" | grep -v "^report"; done
tar czf "$OUT/validate.tgz" -C /tmp val
grep -h "^bf16\|^fp8\|FAILED" "$OUT"/bf16.log "$OUT"/fp8.log | cut -c1-900
python3 bench/decode_kernels.py --out "$OUT" 2>&1 | tee "$OUT/decode_kernels.log" | grep -v "^skip"
