#!/usr/bin/env bash
# Device call (issue 7): 35B-A3B full geometry at 8 of 40 layers, one random BF16 checkpoint (bench/e2e.py's,
# the one transformers was timed on), BF16 and FP8 engines built side by side, then ours timed with
# bench/e2e.py (decode B 1/8/64, prefill 512/8192, per-layer times, decode and prefill profiles).
#   bash bench/device_e2e.sh h200 $OUT
set -u
TARGET=${1:-h200}; OUT=${2:?out dir}; W=/tmp/e35
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=/tmp/logs; mkdir -p $W $L
start=$(date +%s)
python3 bench/e2e.py --out $L/ckpt --work $W --preset 35b-a3b --layers 8 --systems "" > $L/ckpt.log 2>&1
echo "checkpoint: $(( $(date +%s) - start )) s"
for d in bf16 fp8; do
  python3 -m qwen35_export.cli build $W/ckpt --target $TARGET --dtype $d --max-batch 64 --max-seq-len 8256 \
    --out $W/eng_$d > $L/build_$d.log 2>&1 &
done
wait
echo "builds: $(( $(date +%s) - start )) s"; tail -2 $L/build_*.log
for d in bf16 fp8; do
  left=$(( 585 - ($(date +%s) - start) ))
  [ $left -gt 40 ] && python3 bench/e2e.py --out $OUT/$d --work $W --preset 35b-a3b --layers 8 --target $TARGET \
    --systems ours-$d --timeout $left > $L/e2e_$d.log 2>&1
  echo "e2e $d: $(( $(date +%s) - start )) s"; grep -a "decode B\|prefill T" $L/e2e_$d.log | tail -6
done
tar czf $OUT/logs.tgz -C /tmp logs
