#!/usr/bin/env bash
# Device call (issues 6, 7): 35B-A3B full geometry at 8 of its 40 layers (two blocks of 3 GDN + 1 attention).
# One random BF16 checkpoint written on the GPU (bench/e2e.py's, so its comparison with transformers reuses
# it); BF16 and FP8 engines built from it side by side (FP8: the BF16 weights quantised to 128x128 blocks at
# build) while the kernel tests and decode kernel timings run; then every engine validated against both
# references (fp32 on the GPU), two runs at a time. WORK is kept for a next call on a warm machine.
# Logs and validate reports come back as one run.tgz (the device returns at most 8 files).
# Usage (on the device, repo root): bash bench/device_35b.sh h200 $OUT [WORK] [SECONDS]
set -u
TARGET=${1:-h200}; OUT=${2:?out dir}; W=${3:-.work/e35}; BUDGET=${4:-560}
export PYTHONUNBUFFERED=1
Q="python3 -m qwen35_export.cli"
L=/tmp/logs
mkdir -p "$W" $L /tmp/val
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
finish() { tar czf "$OUT/run.tgz" -C /tmp logs val; }
trap finish EXIT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv > $L/gpu.txt 2>&1
python3 bench/e2e.py --out /tmp/e2e_ckpt --work "$W" --preset 35b-a3b --layers 8 --systems "" > $L/ckpt.log 2>&1
echo "checkpoint: $(( $(date +%s) - start )) s"
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -v"  # peak host RSS of each build, where installed
for d in bf16 fp8; do
  [ -f "$W/eng_$d/manifest.json" ] || $TIME $Q build "$W/ckpt" --target "$TARGET" --dtype $d --max-batch 64 \
    --max-seq-len 8448 --out "$W/eng_$d" > $L/build_$d.log 2>&1 &
done
# beside the builds (GPU mostly idle while they compile): real-size kernel tests, then decode kernel timings
( QWEN35_TRITON_GPU=1 TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q tests/kernels/test_fp8_linear.py \
    tests/kernels/test_causal_conv1d.py tests/kernels/test_moe.py -k "cuda or gpu" > $L/gpu_tests.log 2>&1
  mkdir -p $L/conv $L/fused
  timeout 60 python3 bench/decode_kernels.py --out $L/conv --conv1d-only > $L/kernels_conv.log 2>&1
  timeout 120 python3 bench/decode_kernels.py --out $L/fused --fp8-fused-only --fp8-fused-ms 1 \
    > $L/kernels_fused.log 2>&1 ) &
wait
echo "builds + kernels: $(( $(date +%s) - start )) s"
grep -h "Maximum resident\|Elapsed (wall\|stage\|engine\|GiB\|rror" $L/build_*.log | cut -c1-300 | tail -30
for ref in ours transformers; do
  for d in bf16 fp8; do
    timeout $(( $(left) > 30 ? $(left) : 30 )) $Q validate "$W/eng_$d" --checkpoint "$W/ckpt" --reference $ref \
      --random 3 --gen 64 --report /tmp/val/${d}_$ref > $L/val_${d}_$ref.log 2>&1 &
  done
  wait
  echo "validate $ref: $(( $(date +%s) - start )) s"
done
for f in $L/val_*.log; do echo "== $f"; grep -v "it/s\]" "$f" | tail -16 | cut -c1-200; done
tail -4 $L/gpu_tests.log; tail -12 $L/kernels_conv.log; tail -25 $L/kernels_fused.log
