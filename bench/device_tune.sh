#!/usr/bin/env bash
# One device call of kernel sweeps (issues 4, 5, 7), each with its own time limit, results under $OUT:
#  - real-size GPU runs of the FP8-linear and MoE kernel tests (split-K, align small branch);
#  - the two-kernel FP8 linear with split-K at decode row counts (bench/decode_kernels.py --fp8-split-only);
#  - the MoE tile tune at 35B-A3B geometry (bench/moe.py --geometry 35b-a3b --tune): tables to commit;
#  - the GDN chunked-prefill variants (bench/gdn_variants.py), when present;
#  - with BIG397=1: a 397B-A17B engine of one layer of each kind (FP8) built on the CPUs meanwhile (the sweeps
#    time CUDA-graph replays, which host load does not disturb), its per-layer times taken after the sweeps.
#   [BIG397=1] bash bench/device_tune.sh $OUT [TARGET]
set -u
OUT=${1:?out dir}; TARGET=${2:-h200}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p $OUT/logs
start=$(date +%s)
rm -f /tmp/sweeps.done
if [ "${BIG397:-0}" = 1 ]; then
  python3 bench/device_big.py --out $OUT --preset 397b-a17b --layers 2 --layer-types linear_attention,full_attention \
    --dtype fp8 --target $TARGET --ckpt /tmp/b397_ckpt --engine /dev/shm/b397_engine --tag _2layers --quick \
    --run-after /tmp/sweeps.done > $OUT/logs/b397.log 2>&1 &
fi
QWEN35_TRITON_GPU=1 TRITON_INTERPRET=0 timeout ${T_TESTS:-120} python3 -m pytest -q -x -p no:cacheprovider \
  tests/kernels/test_fp8_linear.py tests/kernels/test_moe.py > $OUT/logs/gpu_tests.log 2>&1
echo "tests ($(( $(date +%s) - start )) s): $(tail -1 $OUT/logs/gpu_tests.log)"
if [ -f bench/gdn_variants.py ]; then
  timeout ${T_GDN:-200} python3 bench/gdn_variants.py --out $OUT/gdn > $OUT/logs/gdn_variants.log 2>&1
  echo "gdn variants ($(( $(date +%s) - start )) s)"; tail -25 $OUT/logs/gdn_variants.log | cut -c1-220
fi
timeout ${T_FP8:-90} python3 bench/decode_kernels.py --out $OUT/fp8 --fp8-split-only > $OUT/logs/fp8_split.log 2>&1
echo "fp8 split ($(( $(date +%s) - start )) s)"; grep "^fp8" $OUT/logs/fp8_split.log | cut -c1-200
timeout ${T_MOE:-120} python3 bench/moe.py --geometry 35b-a3b --tune --tokens 1,8,64,512,4096 --no-loop \
  --out $OUT/moe35 > $OUT/logs/moe35.log 2>&1
echo "moe 35b ($(( $(date +%s) - start )) s)"; grep -v "^  tune" $OUT/logs/moe35.log | cut -c1-200 | tail -30
touch /tmp/sweeps.done
wait
[ "${BIG397:-0}" = 1 ] && { echo "397b ($(( $(date +%s) - start )) s)"; grep -h "^checkpoint\|^build\|rror" $OUT/logs/b397.log | cut -c1-300; }
# the device hands back at most 8 files: everything as one archive
tar czf /tmp/results.tgz -C $OUT . && rm -rf $OUT/* && mv /tmp/results.tgz $OUT/
