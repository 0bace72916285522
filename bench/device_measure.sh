#!/usr/bin/env bash
# One device call that re-measures the engine path after kernel changes (issues 4, 5, 7):
#  - 35B-A3B at 8 of 40 layers: BF16 + FP8 engines built side by side from bench/e2e.py's checkpoint;
#  - while they compile (GPU idle): $TESTS on the GPU, then bench/gdn.py against fla-core (carried wheel, .whl)
#    -> $OUT/gdn, or with GDN=variants bench/gdn_variants.py -> $OUT/gdn_variants (GDN=none: neither);
#  - ours timed with bench/e2e.py (decode B 1/8/64, prefill 512/8192, profiles) -> $OUT/{bf16,fp8};
#  - decode through padded CUDA-graph buckets checked against eager (bench/check_graph_padding.py);
#  - both engines validated against our fp32 reference (flash prefill path on the GPU) -> logs.tgz: val/.
#  - HF_COMPILE=1: torch.compile of transformers' model (bench/e2e.py hf-compile, decode at $HF_BATCHES, default
#    "1", no prefill; HF_MODE = torch.compile mode) compiles and warms up beside the builds, then waits; it is
#    timed once the builds (and the GDN bench) are done, before ours -> $OUT/hf_compile (log: hf_compile.log).
#    It shares the GPU with whatever runs beside the builds (TESTS, the GDN bench): GDN=none keeps those clean.
#   [DTYPES="bf16 fp8"] [BUILD_FLAGS="--no-fused-route"] [CHECKS=1] [MOE_ALIGN=1] [GDN=bench|variants|after|none] [TESTS="pytest args"] [TESTS_TIMEOUT=120]
#   [HF_COMPILE=1 [HF_BATCHES=1,8] [HF_MODE=max-autotune-no-cudagraphs] [HF_TIMEOUT=s]] bash bench/device_measure.sh h200 $OUT [SECONDS]
set -u
TARGET=${1:-h200}; OUT=${2:?out dir}; BUDGET=${3:-585}; W=/tmp/e35
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
Q="python3 -m qwen35_export.cli"
L=/tmp/logs; V=$L/val; mkdir -p $W $L $V  # validate reports travel inside logs.tgz (8 files come back)
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
finish() { tar czf $OUT/logs.tgz -C /tmp logs; }
trap finish EXIT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv > $L/gpu.txt 2>&1
python3 bench/e2e.py --out $L/ckpt --work $W --preset 35b-a3b --layers 8 --systems "" > $L/ckpt.log 2>&1
echo "checkpoint: $(( $(date +%s) - start )) s"
# HF_COMPILE=1: transformers + torch.compile compiles now (CPU, some GPU) and times after /tmp/hf_go appears;
# its own timeout (default: all but 150 s of what is left, kept for ours) ends it with what it measured
HF_PID=
if [ -n "${HF_COMPILE:-}" ]; then
  rm -f /tmp/hf_go /tmp/hf_go.ready
  python3 bench/e2e.py --out $OUT/hf_compile --work $W --preset 35b-a3b --layers 8 --target $TARGET \
    --systems hf-compile --hf-batches "${HF_BATCHES:-1}" --hf-prefill "" ${HF_MODE:+--hf-compile-mode $HF_MODE} \
    --hf-wait /tmp/hf_go --timeout ${HF_TIMEOUT:-$(( $(left) - 150 ))} > $L/hf_compile.log 2>&1 &
  HF_PID=$!
fi
DTYPES=${DTYPES:-bf16 fp8}
BUILDS=
for d in $DTYPES; do
  rm -rf $W/eng_$d  # a warm machine keeps /tmp: never time the previous call's engine
  $Q build $W/ckpt --target $TARGET --dtype $d --max-batch 64 --max-seq-len 8256 --out $W/eng_$d ${BUILD_FLAGS:-} \
    > $L/build_$d.log 2>&1 &
  BUILDS="$BUILDS $!"
done
# beside the builds (GPU otherwise idle): real-size runs of the named kernel tests, then the GDN bench (GDN=bench,
# against fla), its variant sweep (GDN=variants) or nothing (GDN=none)
if [ -n "${TESTS:-}" ]; then
  # eval: TESTS keeps its own quoting (-k 'a or b'); an unquoted $TESTS split it into words (session 11)
  eval "QWEN35_TRITON_GPU=1 TRITON_INTERPRET=0 timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider $TESTS" \
    > $L/gpu_tests.log 2>&1
  echo "gpu tests ($(( $(date +%s) - start )) s): $(tail -1 $L/gpu_tests.log)"
fi
# MOE_ALIGN=1: the MoE align paths past SMALL_M slots (torch ops vs Triton kernels) -> $OUT/align
[ -n "${MOE_ALIGN:-}" ] && timeout 90 python3 bench/align_paths.py --out $OUT/align > $L/align.log 2>&1 \
  && tail -12 $L/align.log
case "${GDN:-bench}" in
  bench) timeout 240 python3 bench/gdn.py --out $OUT/gdn --no-tune > $L/gdn.log 2>&1 ;;
  variants) timeout 220 python3 bench/gdn_variants.py --out $OUT/gdn_variants > $L/gdn_variants.log 2>&1
            tail -30 $L/gdn_variants.log | cut -c1-220 ;;
esac
[ -n "$BUILDS" ] && wait $BUILDS  # the builds only: the HF process runs on until it is let go below
echo "builds (+ gdn bench): $(( $(date +%s) - start )) s"; for f in $L/build_*.log; do tail -n 2 $f; done
grep -a "^| \|total" $L/gdn.log 2>/dev/null | head -30
if [ -n "$HF_PID" ]; then
  echo "hf-compile warmed up: $([ -e /tmp/hf_go.ready ] && echo yes || echo "no, still compiling")"
  touch /tmp/hf_go
  while kill -0 $HF_PID 2>/dev/null && [ $(left) -gt 90 ]; do sleep 1; done
  # past the bound (an HF_TIMEOUT beyond the budget): end its child, whose partial output it still records
  kill -0 $HF_PID 2>/dev/null && { echo "hf-compile: stopped at the budget"; pkill -P $HF_PID; sleep 3; }
  echo "hf-compile: $(( $(date +%s) - start )) s"; grep -a "hf-compile \|error" $L/hf_compile.log | cut -c1-300 | tail -12
fi
# CHECKS=1: the e2e process also runs the padded-bucket check and validate on the engine it loaded (one load)
for d in $DTYPES; do
  # a failed build leaves no engine: say why and spend no budget loading it
  if [ ! -e $W/eng_$d/manifest.json ]; then
    echo "e2e $d: no engine, build failed: $(grep -a 'Error' $L/build_$d.log | tail -1 | cut -c1-300)"; continue
  fi
  [ $(left) -gt 60 ] && python3 bench/e2e.py --out $OUT/$d --work $W --preset 35b-a3b --layers 8 --target $TARGET \
    --systems ours-$d --timeout $(( $(left) - 20 )) ${CHECKS:+--checks $V} > $L/e2e_$d.log 2>&1
  echo "e2e $d: $(( $(date +%s) - start )) s"; grep -a "decode B\|prefill T\|padded\|validate" $L/e2e_$d.log | tail -10
done
# GDN=after: the GDN bench against fla once nothing else runs on the machine (its launch-bound rows are clean)
if [ "${GDN:-}" = after ] && [ $(left) -gt 40 ]; then
  timeout $(( $(left) - 10 )) python3 bench/gdn.py --out $OUT/gdn --no-tune > $L/gdn.log 2>&1
  echo "gdn bench: $(( $(date +%s) - start )) s"; grep -a "^| \|total" $L/gdn.log | head -30
fi
[ -n "${CHECKS:-}" ] && exit 0
# decode through a padded bucket's CUDA graph (B 3, 5, 6) against the eager step -> $OUT/padding_{bf16,fp8}.json
for d in $DTYPES; do
  [ $(left) -gt 100 ] && timeout 60 python3 bench/check_graph_padding.py $W/eng_$d --out $OUT/padding_$d.json \
    > $L/padding_$d.log 2>&1; echo "padding $d ($(( $(date +%s) - start )) s):"; tail -5 $L/padding_$d.log | cut -c1-300
done
for d in $DTYPES; do
  [ $(left) -gt 20 ] && timeout $(( $(left) - 10 )) $Q validate $W/eng_$d --checkpoint $W/ckpt --reference ours \
    --random 2 --gen 32 --report $V/$d > $L/val_$d.log 2>&1 &
done
wait
echo "validate: $(( $(date +%s) - start )) s"
for f in $L/val_*.log; do echo "== $f"; grep -av "it/s\]" "$f" | tail -8 | cut -c1-200; done
