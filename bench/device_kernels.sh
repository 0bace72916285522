#!/usr/bin/env bash
# One device call for the kernel work of a session: real-size GPU tests of the named test files, the
# prefill-attention sweep, the GDN prefill tune, and the compiled per-layer profile (35B-A3B BF16).
#   bash bench/device_kernels.sh $OUT "tests/kernels/test_prefill_attention.py ..."
set -u
OUT=${1:?out dir}
TESTS=${2:-tests/kernels/test_prefill_attention.py}
export PYTHONPATH=$PWD
QWEN35_TRITON_GPU=1 TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -x $TESTS > $OUT/log_tests.txt 2>&1
tail -3 $OUT/log_tests.txt
timeout 120 python3 bench/prefill_attention.py --out $OUT/prefill_attention.json > $OUT/log_attn.txt 2>&1
tail -8 $OUT/log_attn.txt | head -6
timeout 120 python3 -c "
import json, sys; sys.path.insert(0, 'bench')
import gdn
t = gdn.tune(); b = gdn.breakdown()
json.dump({'tune': t, 'breakdown': b}, open('$OUT/gdn_tune.json', 'w'), indent=1, default=str)
print(json.dumps(t['prefill_8192'], indent=1, default=str)); print(t.get('conv1d_prefill_8192')); print(b)
" > $OUT/log_gdn.txt 2>&1
tail -12 $OUT/log_gdn.txt
timeout 150 python3 bench/profile_layers.py --dtype bf16,fp8 --prefill 8192 --decode 1 \
  --out $OUT/profile_35b_compiled.json > $OUT/log_35b_compiled.txt 2>&1
grep '^{' $OUT/log_35b_compiled.txt
cd $OUT && tar czf logs.tgz log_*.txt && rm log_*.txt
