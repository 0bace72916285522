#!/usr/bin/env bash
# Device call: real-size GPU tests of the MoE / conv1d / FP8 linear / attention kernels, the MoE decode
# (align vs pairs) and conv1d prefill sweeps.   bash bench/device_kernels2.sh $OUT
set -u
OUT=${1:?out dir}
export PYTHONPATH=$PWD
QWEN35_TRITON_GPU=1 TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q tests/kernels/test_moe.py \
  tests/kernels/test_causal_conv1d.py tests/kernels/test_fp8_linear.py tests/kernels/test_prefill_attention.py \
  -k "cuda or gpu or real" > $OUT/log_tests.txt 2>&1
tail -4 $OUT/log_tests.txt
timeout 150 python3 bench/gdn.py --conv1d-only --out $OUT/conv1d > $OUT/log_conv.txt 2>&1
tail -5 $OUT/log_conv.txt
timeout 200 python3 bench/moe.py --out $OUT/moe --tokens 1,8,64 --no-loop > $OUT/log_moe.txt 2>&1
tail -30 $OUT/log_moe.txt
cd $OUT && tar czf logs.tgz log_*.txt && rm log_*.txt
