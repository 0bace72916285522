#!/usr/bin/env bash
# One device call: tiny BF16 and FP8 engines for an sm_90 target, built side by side, then each loaded in a
# fresh process (tokens vs the reference, CUDA graphs vs eager, decode speed) and validated against both
# references. Usage (on the device): bash bench/device_tiny.sh h200 $OUT
set -u
TARGET=${1:-h100}; OUT=${2:?out dir}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
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
for f in /tmp/val/*.log; do echo "== $f"; tail -25 "$f"; done
tar czf "$OUT/validate.tgz" -C /tmp val
grep -h "^bf16\|^fp8\|FAILED" "$OUT"/*.log | cut -c1-1500
